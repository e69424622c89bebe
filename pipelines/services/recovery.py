"""Hand back rows whose claimer died: a lease that expired means the worker holding it is gone."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from pipelines.models import (
    DataTransfer,
    DataTransferPackage,
    DeletionTask,
    ExecutedReductionStep,
    LongTermArchiveTransfer,
    Operation,
    RawDataPackage,
    RunStatus,
    StagingJob,
)

from .operations import abandoned_claim, operation_recover
from .states import TransitionConflict, transition

log = logging.getLogger(__name__)

OPERATION_MODELS: tuple[type[Operation], ...] = (
    RawDataPackage,
    DataTransferPackage,
    DataTransfer,
    LongTermArchiveTransfer,
    StagingJob,
    DeletionTask,
)


def _oldest_first(queryset: Any, batch_size: int) -> list[Any]:
    return list(
        queryset.order_by(F("lease_expires_at").asc(nulls_first=True), "updated_at")[:batch_size]
    )


def recover_expired_leases(*, batch_size: int = 500, actor: str = "recovery") -> dict[str, int]:
    """Hand back each abandoned claim (``OperationQuerySet.abandoned``) of every operation table
    and every phase (a transfer's copy and its unpacking) through ``operation_recover``: a claim
    that never started goes back to pending at no cost, one that started uses a retry or fails
    when none are left. Reduction runs the workflow manager claimed (``staging_data``) go back to
    pending. Safe to run concurrently: each move is conditional on the row still being abandoned
    under the same claim, so a row another recoverer or a late worker moved first, or one
    re-claimed or renewed since it was listed, is skipped. Returns rows moved per table (and per
    phase other than ``status``, as ``<table>.<field>``)."""
    now = timezone.now()
    counts: dict[str, int] = {}
    for model in OPERATION_MODELS:
        for field in model.PHASES:
            rows = _oldest_first(model.objects.abandoned(now, field), batch_size)
            done = sum(operation_recover(row, now=now, field=field, actor=actor) for row in rows)
            key = model._meta.db_table if field == "status" else f"{model._meta.db_table}.{field}"
            counts[key] = done
    counts[ExecutedReductionStep._meta.db_table] = _recover_runs(now, batch_size, actor)
    if any(counts.values()):
        log.warning("recovered expired leases: %s", counts)
    return counts


def _recover_runs(now: Any, batch_size: int, actor: str) -> int:
    cutoff = now - timedelta(seconds=settings.WORKFLOW_LEASE_SECONDS)
    runs = ExecutedReductionStep.objects.filter(
        Q(lease_expires_at__lt=now) | Q(lease_expires_at__isnull=True, updated_at__lt=cutoff),
        status=RunStatus.STAGING_DATA,
    )
    done = 0
    for run in _oldest_first(runs, batch_size):
        reason, where = abandoned_claim(run, now)
        try:
            transition(
                run,
                RunStatus.PENDING,
                actor=actor,
                reason=f"workflow manager claim abandoned: {reason}",
                where=where,
                updates={"lease_owner": "", "lease_expires_at": None, "claim_token": ""},
            )
            done += 1
        except TransitionConflict:
            continue
    return done
