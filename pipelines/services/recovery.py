"""Hand back rows whose claimer died: a lease that expired means the worker holding it is gone."""

from __future__ import annotations

import logging

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
    Status,
)

from .operations import operation_settle_failure
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


def recover_expired_leases(*, batch_size: int = 500, actor: str = "recovery") -> dict[str, int]:
    """Return each claimed row whose lease has expired to ``pending`` (one more retry used) or,
    when its retries are spent, to ``failed``. Safe to run concurrently: each move is
    conditional on the lease still being expired, so a row another recoverer or a late worker
    moved first, or one re-claimed or renewed since it was listed, is skipped. Returns the
    number of rows moved per table."""
    now = timezone.now()
    counts: dict[str, int] = {}
    for model in OPERATION_MODELS:
        expired = list(
            model._default_manager.filter(
                status__in=[Status.SCHEDULED, Status.IN_PROGRESS], lease_expires_at__lt=now
            ).order_by("lease_expires_at")[:batch_size]
        )
        done = 0
        for row in expired:
            reason = (
                f"lease held by {row.lease_owner or 'unknown'} expired at {row.lease_expires_at}"
            )
            if operation_settle_failure(
                row, message=reason, actor=actor, where={"lease_expires_at__lt": now}
            ):
                done += 1
        counts[model._meta.db_table] = done
    runs = list(
        ExecutedReductionStep.objects.filter(
            status=RunStatus.STAGING_DATA, lease_expires_at__lt=now
        ).order_by("lease_expires_at")[:batch_size]
    )
    done = 0
    for run in runs:
        try:
            transition(
                run,
                RunStatus.PENDING,
                actor=actor,
                reason=f"workflow manager lease of {run.lease_owner or 'unknown'} expired",
                where={"lease_expires_at__lt": now},
                updates={"lease_owner": "", "lease_expires_at": None},
            )
            done += 1
        except TransitionConflict:
            continue
    counts[ExecutedReductionStep._meta.db_table] = done
    if any(counts.values()):
        log.warning("recovered expired leases: %s", counts)
    return counts
