"""Claim, lease and settle: the life of an operation row, shared by every manager and worker.

A manager claims due rows with ``operation_claim_batch`` (pending -> scheduled, with a lease and
a claim token new for that claim) and enqueues one task per row with the token. The worker calls
``operation_start`` (scheduled -> in_progress), renews its lease with ``operation_renew_lease``
during long I/O, and ends with ``operation_complete``; when it raises, the task base class calls
``operation_fail``. Every one of those moves is conditional on the claim token, so a report from
an earlier claim (a worker whose lease expired, whose row was handed back and claimed again)
changes nothing. ``operation_recover`` is the reconciler's move for an abandoned claim.

A row may have more than one phase (``Operation.PHASES``): a transfer's ``status`` (the copy)
and then its ``unpack_status``. Each function takes the phase's state field as ``field``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from pipelines.models import (
    DataTransfer,
    LongTermArchiveTransfer,
    Operation,
    PackageState,
    RawDataPackage,
    Status,
)

from .states import ForbiddenTransition, TransitionConflict, transition, transition_batch

log = logging.getLogger(__name__)
alerts = logging.getLogger("pipelines.alerts")

OpT = TypeVar("OpT", bound=Operation)

_CLEAR_LEASE = {"lease_owner": "", "lease_expires_at": None, "claim_token": ""}
_MESSAGE_LIMIT = 5000


class ClaimLost(TransitionConflict):
    """The row is no longer held by this claim (recovered, re-claimed, or settled by someone
    else). The worker must stop and leave the row alone."""


@dataclass(frozen=True)
class Claim:
    """What a manager hands each worker task: the row ids claimed together and their token."""

    token: str
    ids: list[int]


def new_claim_token() -> str:
    return secrets.token_hex(16)


def lease_expiry(seconds: int | None = None) -> Any:
    return timezone.now() + timedelta(seconds=seconds or settings.WORKFLOW_LEASE_SECONDS)


def operation_claim_batch(
    model: type[Operation],
    *,
    owner: str,
    limit: int,
    field: str = "status",
    lease_seconds: int | None = None,
    queryset: Any = None,
    actor: str | None = None,
) -> Claim:
    """Claim up to ``limit`` due rows of ``model`` (``queryset`` narrows them; default
    ``model.objects.due(field)``): pending -> scheduled with a lease held by ``owner`` and one
    new claim token, events written in bulk, all in one transaction. Returns the token and the
    ids claimed (possibly none). Safe with several managers at once: a row is claimed once."""
    token = new_claim_token()
    candidates = queryset if queryset is not None else model.objects.due(field)
    ids = transition_batch(
        candidates,
        Status.SCHEDULED,
        field=field,
        expected=Status.PENDING,
        actor=actor or f"manager:{owner}",
        reason="claimed",
        updates={
            "lease_owner": owner[:200],
            "lease_expires_at": lease_expiry(lease_seconds),
            "claim_token": token,
        },
        marker="claim_token",
        limit=limit,
    )
    return Claim(token=token, ids=ids)


def operation_dispatch(task: Any, token: str, queues: dict[int, str]) -> None:
    """Enqueue ``task(pk, claim_token=token)`` on ``queues[pk]`` for each claimed row, once the
    current transaction commits (at once outside one), so a worker never looks for a claim that
    is not visible yet. A row whose enqueue fails stays scheduled and is handed back at no cost
    when its lease expires."""
    for pk, queue in queues.items():
        transaction.on_commit(functools.partial(_enqueue, task, pk, token, queue))


def operation_claim_and_dispatch(
    model: type[Operation],
    task: Any,
    *,
    owner: str,
    queue_of: Callable[[Any], str],
    field: str = "status",
    limit: int = 500,
    queryset: Any = None,
    select_related: tuple[str, ...] = (),
) -> int:
    """The second half of every manager tick: claim up to ``limit`` due rows
    (``operation_claim_batch``) and enqueue ``task`` for each on ``queue_of(row)`` after the
    claim commits. A row whose queue cannot be named (``ValueError``, ``NonRetryableError``:
    an operation its location does not do, a missing location) fails at once with that
    message instead of waiting for its lease. Returns the number of rows claimed."""
    from pipelines.exceptions import NonRetryableError

    claim = operation_claim_batch(model, owner=owner, limit=limit, field=field, queryset=queryset)
    rows = model._default_manager.filter(pk__in=claim.ids).select_related(*select_related)
    queues: dict[int, str] = {}
    for row in rows:
        try:
            queues[row.pk] = queue_of(row)
        except (NonRetryableError, ValueError) as exc:
            operation_fail(
                model,
                row.pk,
                token=claim.token,
                message=f"cannot dispatch: {exc}",
                actor=f"manager:{owner}",
                retryable=False,
                field=field,
            )
    operation_dispatch(task, claim.token, queues)
    return len(claim.ids)


def _enqueue(task: Any, pk: int, token: str, queue: str) -> None:
    try:
        task.apply_async(args=[pk], kwargs={"claim_token": token}, queue=queue)
    except Exception:
        log.exception(
            "could not enqueue %s for row %s on %s; lease recovery will retry it",
            task.name,
            pk,
            queue,
        )


def _held(token: str, field: str, *states: str) -> dict[str, Any]:
    if not token:
        raise ClaimLost("no claim token given: only the holder of a claim may move its row")
    return {"claim_token": token, f"{field}__in": list(states)}


def _conditional(row: OpT, to: str, *, field: str, token: str, **kwargs: Any) -> OpT:
    try:
        return transition(row, to, field=field, **kwargs)
    except TransitionConflict as exc:
        raise ClaimLost(
            f"{row._meta.db_table} {row.pk}: claim {token[:8]} no longer holds the row ({exc})"
        ) from exc


def operation_start(
    row: OpT, *, token: str, owner: str, field: str = "status", lease_seconds: int | None = None
) -> OpT:
    """scheduled -> in_progress for the worker holding ``token``, with a fresh lease. Raises
    ``ClaimLost`` when the claim no longer holds the row (a redelivered task whose row was
    handed back, or is held by a newer claim): the worker then does nothing."""
    row.refresh_from_db()
    return _conditional(
        row,
        Status.IN_PROGRESS,
        field=field,
        token=token,
        actor=f"worker:{owner}",
        reason="started",
        expected=Status.SCHEDULED,
        where=_held(token, field, Status.SCHEDULED),
        updates={
            "lease_owner": owner[:200],
            "lease_expires_at": lease_expiry(lease_seconds),
            row.PHASES[field].started_field: timezone.now(),
        },
    )


def operation_renew_lease(
    model: type[Operation],
    pk: int,
    *,
    token: str,
    field: str = "status",
    lease_seconds: int | None = None,
) -> bool:
    """Push the lease of a row this claim still holds; False when it no longer does (the worker
    must stop). Not a state move, so no event is written."""
    if not token:
        return False
    requires = model.PHASES[field].requires
    return bool(
        model._default_manager.filter(
            pk=pk, **_held(token, field, Status.SCHEDULED, Status.IN_PROGRESS), **requires
        ).update(lease_expires_at=lease_expiry(lease_seconds), updated_at=timezone.now())
    )


def operation_complete(
    row: OpT,
    *,
    token: str,
    actor: str,
    field: str = "status",
    reason: str = "completed",
    updates: dict[str, Any] | None = None,
) -> OpT:
    """in_progress -> completed for the holder of ``token``; clears the lease. ``updates`` are
    written in the same UPDATE (e.g. an idempotency key or a checksum). Raises ``ClaimLost``."""
    return _conditional(
        row,
        Status.COMPLETED,
        field=field,
        token=token,
        actor=actor,
        reason=reason,
        expected=Status.IN_PROGRESS,
        where=_held(token, field, Status.IN_PROGRESS),
        updates={
            **_CLEAR_LEASE,
            row.PHASES[field].finished_field: timezone.now(),
            **(updates or {}),
        },
    )


def operation_fail(
    model: type[Operation],
    pk: int,
    *,
    token: str,
    message: str,
    actor: str,
    retryable: bool,
    field: str = "status",
) -> bool:
    """The one failure entry point, called by the task base class when a worker raises.

    While the claim ``token`` still holds the row: a retryable error with retries left puts the
    row back to pending with one more retry used; otherwise the row fails for good, the packages
    that depended on it fail, and an operator is alerted. Returns True when the row moved.
    Without the token (a late report about an earlier claim, or a row settled meanwhile) nothing
    changes and False is returned."""
    row = model._default_manager.filter(pk=pk).first()
    if row is None:
        log.warning("%s %s does not exist; failure report ignored: %s", model, pk, message)
        return False
    current = getattr(row, field)
    if (
        not token
        or row.claim_token != token
        or current not in (Status.SCHEDULED, Status.IN_PROGRESS)
    ):
        log.info(
            "%s %s is %s under claim %s, not %s; failure report ignored: %s",
            row._meta.db_table,
            pk,
            current,
            row.claim_token[:8] or "-",
            (token or "-")[:8],
            message,
        )
        return False
    try:
        _settle(
            row,
            field=field,
            message=message,
            actor=actor,
            retryable=retryable,
            where={"claim_token": token},
        )
    except TransitionConflict as exc:
        log.info("failure report not applied: %s", exc)
        return False
    return True


def operation_recover(row: OpT, *, now: Any, field: str = "status", actor: str) -> bool:
    """The reconciler's move for an abandoned claim (see ``OperationQuerySet.abandoned``).

    A claim that never started (``scheduled``: the task waited in the queue, or was lost before
    a worker took it) goes back to pending without using a retry, so a long backlog never fails
    rows that never ran. A claim that started and was abandoned (the worker died) counts as a
    failed attempt: pending with one more retry used, or failed when none are left. Conditional
    on the row still being abandoned under the same claim; returns True when it moved."""
    reason, where = abandoned_claim(row, now)
    try:
        if getattr(row, field) == Status.SCHEDULED:
            transition(
                row,
                Status.PENDING,
                field=field,
                actor=actor,
                reason=f"claim never started ({reason}); no retry used",
                where=where,
                updates=dict(_CLEAR_LEASE),
            )
        else:
            _settle(row, field=field, message=reason, actor=actor, retryable=True, where=where)
    except TransitionConflict as exc:
        log.info("recovery not applied: %s", exc)
        return False
    return True


def abandoned_claim(row: Any, now: Any) -> tuple[str, dict[str, Any]]:
    """Why ``row``'s claim counts as abandoned, and the lookups a conditional move must still
    match for it to be the same abandoned claim (not one renewed or re-claimed since)."""
    if row.lease_expires_at is not None:
        reason = f"lease held by {row.lease_owner or 'unknown'} expired at {row.lease_expires_at}"
        where: dict[str, Any] = {"lease_expires_at__lt": now}
    else:
        reason = f"claimed with no lease and unchanged since {row.updated_at}"
        where = {"lease_expires_at__isnull": True, "updated_at": row.updated_at}
    where["claim_token"] = row.claim_token
    return reason, where


def operation_reset(row: OpT, *, actor: str, reason: str, field: str = "status") -> OpT:
    """An operator's reset of a failed row (or failed unpacking): back to pending with its
    retries restored, so the manager claims it again. Raises ``ForbiddenTransition`` when the
    row is not failed, ``TransitionConflict`` when it moved meanwhile."""
    phase = row.PHASES[field]
    return transition(
        row,
        Status.PENDING,
        field=field,
        actor=actor,
        reason=reason,
        updates={**_CLEAR_LEASE, phase.retry_field: 0, phase.error_field: ""},
    )


def _settle(
    row: OpT, *, field: str, message: str, actor: str, retryable: bool, where: dict[str, Any]
) -> None:
    phase = row.PHASES[field]
    used = getattr(row, phase.retry_field)
    message = message[:_MESSAGE_LIMIT]
    if retryable and used < row.max_retries:
        transition(
            row,
            Status.PENDING,
            field=field,
            actor=actor,
            reason=f"retrying: {message}",
            where=where,
            updates={
                **_CLEAR_LEASE,
                phase.retry_field: F(phase.retry_field) + 1,
                phase.error_field: message,
            },
        )
        return
    if retryable:
        message = f"{message} (gave up after {used} retries)"
    with transaction.atomic():
        updates: dict[str, Any] = {
            **_CLEAR_LEASE,
            phase.error_field: message,
            phase.finished_field: timezone.now(),
        }
        transition(
            row,
            Status.FAILED,
            field=field,
            actor=actor,
            reason=message,
            where=where,
            updates=updates,
        )
        for package in _packages_of(row):
            _fail_package_state(
                package, actor=actor, reason=f"{row._meta.db_table} {row.pk}: {message}"
            )
    alerts.error(
        "%s %s%s failed permanently (%d retries used): %s",
        row._meta.verbose_name,
        row.pk,
        "" if field == "status" else f" ({field})",
        used,
        message,
    )


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


class LeaseKeeper:
    """Keeps a claim's lease alive while its worker does long I/O.

    Used as a context manager around the work: a background thread renews the lease every third
    of the lease period (``operation_renew_lease``). Once a renewal finds the claim gone (the row
    was recovered and claimed again, or an operator reset it) or the renewal keeps failing until
    the lease would have run out, ``lost`` is set, and ``check()``, which the work calls between
    chunks, raises ``ClaimLost`` so the worker stops instead of racing the new claim.
    """

    def __init__(
        self,
        model: type[Operation],
        pk: int,
        *,
        token: str,
        field: str = "status",
        lease_seconds: int | None = None,
    ) -> None:
        import threading

        self.model = model
        self.pk = pk
        self.token = token
        self.field = field
        self.lease_seconds = lease_seconds or settings.WORKFLOW_LEASE_SECONDS
        self.interval = max(self.lease_seconds / 3, 0.2)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{model._meta.db_table}-{pk}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def check(self) -> None:
        if self.lost.is_set():
            raise ClaimLost(
                f"{self.model._meta.db_table} {self.pk}: lease lost during the work "
                f"(claim {self.token[:8]}); stopping"
            )

    def _run(self) -> None:
        import time

        from django.db import connection

        # A renewal may fail for a while (database restarting); the lease is lost only once it
        # would have expired without a successful renewal.
        deadline = time.monotonic() + self.lease_seconds
        try:
            while not self._stop.wait(self.interval):
                try:
                    held = operation_renew_lease(
                        self.model,
                        self.pk,
                        token=self.token,
                        field=self.field,
                        lease_seconds=self.lease_seconds,
                    )
                except Exception:
                    log.warning("lease renewal of %s %s failed", self.model, self.pk, exc_info=True)
                    connection.close()
                    if time.monotonic() >= deadline:
                        self.lost.set()
                        return
                    continue
                if not held:
                    log.warning(
                        "%s %s is no longer held by claim %s; stopping its work",
                        self.model._meta.db_table,
                        self.pk,
                        self.token[:8],
                    )
                    self.lost.set()
                    return
                deadline = time.monotonic() + self.lease_seconds
        finally:
            connection.close()
