"""Hand back rows whose claimer died: a lease that expired means the worker holding it is gone."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Model
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


def _abandoned(model: type[Model], statuses: Sequence[str], now: Any, batch_size: int) -> list[Any]:
    """Claimed rows whose lease expired, and claimed rows with no lease at all that have not
    changed for a whole lease period (``NULL < now`` is never true, so a claim written without
    a lease would otherwise stay claimed forever)."""
    cutoff = now - timedelta(seconds=settings.WORKFLOW_LEASE_SECONDS)
    manager = model._default_manager
    expired = manager.filter(status__in=statuses, lease_expires_at__lt=now)
    leaseless = manager.filter(
        status__in=statuses, lease_expires_at__isnull=True, updated_at__lt=cutoff
    )
    rows = list(expired.order_by("lease_expires_at")[:batch_size])
    rows += list(leaseless.order_by("updated_at")[: max(batch_size - len(rows), 0)])
    return rows


def _still_abandoned(row: Any, now: Any) -> tuple[str, dict[str, Any]]:
    """The reason to give, and the condition the conditional UPDATE must still meet."""
    if row.lease_expires_at is not None:
        reason = f"lease held by {row.lease_owner or 'unknown'} expired at {row.lease_expires_at}"
        return reason, {"lease_expires_at__lt": now}
    reason = f"claimed with no lease and unchanged since {row.updated_at}"
    return reason, {"lease_expires_at__isnull": True, "updated_at": row.updated_at}


def recover_expired_leases(*, batch_size: int = 500, actor: str = "recovery") -> dict[str, int]:
    """Return each claimed row whose lease has expired (or that was claimed with no lease and
    has not changed for ``WORKFLOW_LEASE_SECONDS``) to ``pending`` (one more retry used) or,
    when its retries are spent, to ``failed``. Safe to run concurrently: each move is
    conditional on the row still being abandoned, so a row another recoverer or a late worker
    moved first, or one re-claimed or renewed since it was listed, is skipped. Returns the
    number of rows moved per table."""
    now = timezone.now()
    counts: dict[str, int] = {}
    claimed = [Status.SCHEDULED, Status.IN_PROGRESS]
    for model in OPERATION_MODELS:
        done = 0
        for row in _abandoned(model, claimed, now, batch_size):
            reason, where = _still_abandoned(row, now)
            if operation_settle_failure(row, message=reason, actor=actor, where=where):
                done += 1
        counts[model._meta.db_table] = done
    done = 0
    for run in _abandoned(ExecutedReductionStep, [RunStatus.STAGING_DATA], now, batch_size):
        reason, where = _still_abandoned(run, now)
        try:
            transition(
                run,
                RunStatus.PENDING,
                actor=actor,
                reason=f"workflow manager claim abandoned: {reason}",
                where=where,
                updates={"lease_owner": "", "lease_expires_at": None},
            )
            done += 1
        except TransitionConflict:
            continue
    counts[ExecutedReductionStep._meta.db_table] = done
    if any(counts.values()):
        log.warning("recovered expired leases: %s", counts)
    return counts
