"""Hand back rows whose claimer died: a lease that expired means the worker holding it is gone."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone

from pipelines.models import (
    CopyRepair,
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
    CopyRepair,
)


def _oldest_first(queryset: Any, batch_size: int) -> list[Any]:
    return list(
        queryset.order_by(F("lease_expires_at").asc(nulls_first=True), "updated_at")[:batch_size]
    )


def abandoned_claims(now: Any, *, batch_size: int = 500) -> Iterator[tuple[str, str, list[Any]]]:
    """(key, state field, rows) for every operation table and phase, then the reduction runs,
    with up to ``batch_size`` abandoned claims each, oldest lease first. ``key`` is the table
    name, or ``<table>.<field>`` for a phase other than ``status``."""
    for model in OPERATION_MODELS:
        for field in model.PHASES:
            key = model._meta.db_table if field == "status" else f"{model._meta.db_table}.{field}"
            yield key, field, _oldest_first(model.objects.abandoned(now, field), batch_size)
    cutoff = now - timedelta(seconds=settings.WORKFLOW_LEASE_SECONDS)
    runs = ExecutedReductionStep.objects.filter(
        Q(lease_expires_at__lt=now) | Q(lease_expires_at__isnull=True, updated_at__lt=cutoff),
        status=RunStatus.STAGING_DATA,
    )
    yield ExecutedReductionStep._meta.db_table, "status", _oldest_first(runs, batch_size)


def recover_expired_leases(*, batch_size: int = 500, actor: str = "recovery") -> dict[str, int]:
    """Hand back each abandoned claim (``abandoned_claims``) of every operation table and every
    phase (a transfer's copy and its unpacking) through ``operation_recover``: a claim that never
    started goes back to pending at no cost, one that started uses a retry or fails when none
    are left. Reduction runs the workflow manager claimed (``staging_data``) go back to pending.
    Safe to run concurrently: each move is conditional on the row still being abandoned under
    the same claim, so a row another recoverer or a late worker moved first, or one re-claimed
    or renewed since it was listed, is skipped. Returns rows moved per key of
    ``abandoned_claims``."""
    now = timezone.now()
    counts: dict[str, int] = {}
    for key, field, rows in abandoned_claims(now, batch_size=batch_size):
        if key == ExecutedReductionStep._meta.db_table:
            counts[key] = sum(_recover_run(run, now, actor) for run in rows)
        else:
            counts[key] = sum(
                operation_recover(row, now=now, field=field, actor=actor) for row in rows
            )
    if any(counts.values()):
        log.warning("recovered expired leases: %s", counts)
    return counts


def _recover_run(run: ExecutedReductionStep, now: Any, actor: str) -> bool:
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
    except TransitionConflict:
        return False
    return True
