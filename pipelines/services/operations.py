"""What happens to an operation row when its work fails: retry or fail for good.

Used by the task base class (``pipelines.tasks.OperationTask``) and by lease recovery, so a
worker that raised and a worker that died are treated alike.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, TypeVar

from django.db import transaction
from django.db.models import F

from pipelines.models import (
    DataTransfer,
    LongTermArchiveTransfer,
    Operation,
    PackageState,
    RawDataPackage,
    Status,
)

from .states import ForbiddenTransition, TransitionConflict, transition

log = logging.getLogger(__name__)
alerts = logging.getLogger("pipelines.alerts")

OpT = TypeVar("OpT", bound=Operation)

_CLEAR_LEASE = {"lease_owner": "", "lease_expires_at": None}


def operation_reset_for_retry(
    row: OpT, *, message: str, actor: str, where: dict[str, Any] | None = None
) -> OpT:
    """Put a claimed row back to ``pending`` with one more retry used. ``where``: see
    ``transition``."""
    return transition(
        row,
        Status.PENDING,
        actor=actor,
        reason=f"retrying: {message}",
        where=where,
        updates={
            **_CLEAR_LEASE,
            "retry_count": F("retry_count") + 1,
            "failure_error_message": message[:5000],
        },
    )


def operation_mark_failed(
    row: OpT, *, message: str, actor: str, where: dict[str, Any] | None = None
) -> OpT:
    """Fail the row for good, fail the packages that depended on it, and alert an operator.
    ``where``: see ``transition``; when the row no longer matches, nothing is failed."""
    from django.utils import timezone

    with transaction.atomic():
        transition(
            row,
            Status.FAILED,
            actor=actor,
            reason=message,
            where=where,
            updates={
                **_CLEAR_LEASE,
                "failure_error_message": message[:5000],
                "finished_at": timezone.now(),
            },
        )
        for package in _packages_of(row):
            _fail_package_state(
                package, actor=actor, reason=f"{row._meta.db_table} {row.pk}: {message}"
            )
    alerts.error(
        "%s %s failed permanently (%d retries used): %s",
        row._meta.verbose_name,
        row.pk,
        row.retry_count,
        message,
    )
    return row


def operation_settle_failure(
    row: Operation,
    *,
    message: str,
    actor: str,
    retryable: bool = True,
    owner: str | None = None,
    where: dict[str, Any] | None = None,
) -> bool:
    """Reset ``row`` for retry while retries remain and the error is retryable, else fail it.
    Returns True when this call moved the row, False when it left it alone.

    Re-reads the row first. Left alone: a row already settled (pending, completed, failed);
    with ``owner``, an ``in_progress`` row whose lease another worker holds (this report is
    late: the claim it was about was recovered and taken over); and a row that changed between
    the read and the conditional UPDATE (lost race), or no longer matches ``where``.
    """
    row.refresh_from_db()
    if row.status in (Status.COMPLETED, Status.FAILED, Status.PENDING):
        # Already settled by someone else (a finished retry, an operator): nothing to undo.
        log.info(
            "%s %s is %s; failure report ignored: %s",
            row._meta.db_table,
            row.pk,
            row.status,
            message,
        )
        return False
    conditions = dict(where or {})
    if owner is not None and row.status == Status.IN_PROGRESS:
        if row.lease_owner and row.lease_owner != owner:
            log.warning(
                "%s %s is in progress under %s, not %s; late failure report ignored: %s",
                row._meta.db_table,
                row.pk,
                row.lease_owner,
                owner,
                message,
            )
            return False
        # The claim must still be the one just read when the UPDATE runs.
        conditions["lease_owner"] = row.lease_owner
    try:
        if retryable and row.retry_count < row.max_retries:
            operation_reset_for_retry(row, message=message, actor=actor, where=conditions)
        else:
            if retryable:
                message = f"{message} (gave up after {row.retry_count} retries)"
            operation_mark_failed(row, message=message, actor=actor, where=conditions)
    except TransitionConflict as exc:
        log.info("failure report not applied: %s", exc)
        row.refresh_from_db()
        return False
    return True


def operation_retry_or_fail(
    row: OpT, *, message: str, actor: str, retryable: bool = True, owner: str | None = None
) -> OpT:
    """Reset for retry while retries remain and the error is retryable; otherwise fail.
    Returns the row as it is afterwards (see ``operation_settle_failure`` for when it is left
    alone)."""
    operation_settle_failure(row, message=message, actor=actor, retryable=retryable, owner=owner)
    return row


def _packages_of(row: Operation) -> list[RawDataPackage]:
    if isinstance(row, RawDataPackage):
        return [row]
    if isinstance(row, LongTermArchiveTransfer):
        return [row.raw_data_package]
    if isinstance(row, DataTransfer):
        return list(
            RawDataPackage.objects.filter(
                data_transfer_package_id=row.data_transfer_package_id,
                state=PackageState.TRANSFERRING,
            )
        )
    return []


def _fail_package_state(package: RawDataPackage, *, actor: str, reason: str) -> None:
    package.refresh_from_db(fields=["state"])
    # ARCHIVED packages stay archived (another copy made it), FAILED ones stay failed.
    with contextlib.suppress(ForbiddenTransition, TransitionConflict):
        transition(package, PackageState.FAILED, field="state", actor=actor, reason=reason)
