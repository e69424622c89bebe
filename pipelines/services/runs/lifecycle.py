"""Failing a run (with or without a retry left), the automatic retry, releasing the staging job,
and the operator's moves: cancel and retry."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from pipelines.exceptions import is_retryable
from pipelines.models import (
    ACTIVE_RUN_STATUSES,
    CANCELLABLE_RUN_STATUSES,
    ExecutedReductionStep,
    RunStatus,
    StagingJob,
)

from ..states import TransitionConflict, transition

if TYPE_CHECKING:
    pass


from .common import (
    _CLEAR_LEASE,
    _MESSAGE_LIMIT,
    _NEEDS_INPUTS,
    LIVE_STAGING,
    RunConflict,
    _allowed,
    alerts,
    attempt_entry,
    served_runs,
)

log = logging.getLogger(__name__)


# --- failing, retrying, releasing ----------------------------------------------------------------
def run_fail(
    run_id: int,
    *,
    token: str | None,
    reason: str,
    actor: str,
    for_good: bool = False,
    updates: dict[str, Any] | None = None,
    where: dict[str, Any] | None = None,
) -> int:
    """Fail the run's current attempt: FAILED with ``reason``, the lease cleared, and
    ``failed_for_good`` set in the same UPDATE when ``for_good`` or no retry is left (until then
    the failed run keeps its sub-group and the result manager retries it). ``token``, when
    given, must still hold the run, and so must the lookups in ``where`` (the job id a poll
    read). ``updates`` are written in the same UPDATE (exit code, metrics). Returns 1 when the
    run moved, 0 when it had moved on (a late
    report changes nothing)."""
    run = ExecutedReductionStep.objects.filter(pk=run_id).first()
    if run is None or RunStatus.FAILED not in _allowed(run.status):
        return 0
    reason = reason[:_MESSAGE_LIMIT]
    where = {**(where or {}), **({"claim_token": token} if token else {})}
    for_good = for_good or run.retry_count >= run.max_retries
    attempts = [
        *run.attempts,
        attempt_entry(run, outcome="failed", reason=reason, **(updates or {})),
    ]
    try:
        with transaction.atomic():
            transition(
                run,
                RunStatus.FAILED,
                actor=actor,
                reason=reason,
                where=where,
                updates={
                    **_CLEAR_LEASE,
                    **(updates or {}),
                    "failure_reason": reason,
                    "failed_for_good": for_good,
                    "finished_at": timezone.now(),
                    "attempts": attempts,
                },
            )
            if for_good:
                run_release_staging(run)
    except TransitionConflict as exc:
        log.info("failure of run %s not recorded: %s", run_id, exc)
        return 0
    if for_good:
        alerts.error(
            "run %s (%s, %s) failed for good after %d attempt(s): %s",
            run.pk, run.reduction_step_id, run.sub_group_key, run.attempt, reason,
        )  # fmt: skip
    return 1


def run_fail_for_exception(run_id: int, exc: BaseException, *, token: str, actor: str) -> int:
    """The submission and collection tasks' failure path: transient errors (``is_retryable``)
    and backend errors use a retry; errors that would fail the same way again (a defect,
    ``NonRetryableError``, a corrupted input, a bad reduction configuration) fail the run for
    good, with the error as its reason."""
    from pipelines.backends.base import BackendError

    text = str(exc) or exc.__class__.__name__
    retryable = is_retryable(exc) or isinstance(exc, BackendError)
    return run_fail(
        run_id,
        token=token,
        reason=f"{exc.__class__.__name__}: {text}",
        actor=actor,
        for_good=not retryable,
    )


def run_retry_due(*, actor: str, limit: int = 500) -> int:
    """The automatic retry (result manager): FAILED runs with a retry left go back to PENDING
    with ``retry_count`` one higher, so the next attempt gets its own directory and job name.
    Returns how many moved."""
    runs = list(
        served_runs()
        .filter(status=RunStatus.FAILED, failed_for_good=False, retry_count__lt=F("max_retries"))
        .order_by("updated_at")[:limit]
    )
    moved = 0
    for run in runs:
        try:
            _back_to_pending(run, actor=actor, reason=f"retry {run.retry_count + 1} of "
                             f"{run.max_retries}: {run.failure_reason[:200]}")  # fmt: skip
        except (TransitionConflict, IntegrityError) as exc:
            log.info("retry of run %s not applied: %s", run.pk, exc)
            continue
        moved += 1
    return moved


def _back_to_pending(
    run: ExecutedReductionStep, *, actor: str, reason: str, updates: dict[str, Any] | None = None
) -> ExecutedReductionStep:
    # The next attempt waits for the same staging job while it is live; a failed or released
    # one is replaced when the run is claimed again.
    job = run.staging_job
    keep = job is not None and job.active and job.status in LIVE_STAGING
    return transition(
        run,
        RunStatus.PENDING,
        actor=actor,
        reason=reason,
        expected=RunStatus.FAILED,
        where={"failed_for_good": run.failed_for_good, "retry_count": run.retry_count},
        updates={
            **_CLEAR_LEASE,
            "retry_count": F("retry_count") + 1,
            "failed_for_good": False,
            "hpc_job_id": "",
            "idempotency_key": "",
            "submitted_at": None,
            "started_at": None,
            "finished_at": None,
            "exit_code": None,
            "run_dir": "",
            "staging_job": job if keep else None,
            **(updates or {}),
        },
    )


def run_release_staging(run: ExecutedReductionStep) -> bool:
    """Let the run's StagingJob go (``active=False``: its copies are no longer protected from
    deletion) unless another run that still needs inputs uses it. Returns True when released."""
    if run.staging_job_id is None:
        return False
    others = (
        ExecutedReductionStep.objects.filter(_NEEDS_INPUTS, staging_job_id=run.staging_job_id)
        .exclude(pk=run.pk)
        .exists()
    )
    if others:
        return False
    return bool(
        StagingJob.objects.filter(pk=run.staging_job_id, active=True).update(
            active=False, updated_at=timezone.now()
        )
    )


# --- operator moves: cancel and retry ------------------------------------------------------------
def run_cancel(
    run: ExecutedReductionStep, *, actor: str, reason: str = ""
) -> ExecutedReductionStep:
    """Cancel a PENDING, SUBMITTED or RUNNING run: CANCELLED (terminal), then, when it has an
    HPC job, ``backend.cancel(job)`` exactly once, best effort (a backend error is logged and
    recorded in ``failure_reason``; the run stays CANCELLED). Its staging job is released.

    Raises ``RunConflict`` (nothing changed) for any other state, or when the run moved while
    this ran (the result manager saw the job finish first)."""
    run.refresh_from_db()
    if run.status not in CANCELLABLE_RUN_STATUSES:
        raise RunConflict(
            f"run {run.pk} is {run.get_status_display().lower()}; only pending, submitted or "
            "running runs can be cancelled"
        )
    try:
        with transaction.atomic():
            transition(
                run,
                RunStatus.CANCELLED,
                actor=actor,
                reason=reason or "cancelled",
                expected=run.status,
                updates={**_CLEAR_LEASE, "finished_at": timezone.now()},
            )
            run_release_staging(run)
    except TransitionConflict as exc:
        raise RunConflict(f"run {run.pk} changed while being cancelled: {exc}") from exc
    if run.hpc_job_id:
        from pipelines.backends.base import get_backend

        try:
            get_backend().cancel(run.hpc_job_id)
        except Exception as exc:
            note = f"cancelled; the backend could not cancel job {run.hpc_job_id}: {exc}"
            log.warning("run %s: %s", run.pk, note)
            ExecutedReductionStep.objects.filter(pk=run.pk).update(failure_reason=note[:5000])
            run.failure_reason = note
    return run


def run_retry(run: ExecutedReductionStep, *, actor: str, reason: str = "") -> ExecutedReductionStep:
    """An operator's retry of a FAILED run: back to PENDING for its next attempt, with
    ``failed_for_good`` cleared and the step's retry budget granted again from there.

    Raises ``RunConflict`` (nothing changed) when the run is not FAILED, or when its sub-group is
    occupied by another run (the trigger manager created one after this run failed for good)."""
    run.refresh_from_db()
    if run.status != RunStatus.FAILED:
        raise RunConflict(
            f"run {run.pk} is {run.get_status_display().lower()}; only failed runs can be retried"
        )
    occupant = (
        ExecutedReductionStep.objects.filter(
            Q(status__in=ACTIVE_RUN_STATUSES) | Q(status=RunStatus.FAILED, failed_for_good=False),
            reduction_step_id=run.reduction_step_id,
            sub_group_key=run.sub_group_key,
        )
        .exclude(pk=run.pk)
        .values_list("pk", flat=True)
        .first()
    )
    if occupant is not None:
        raise RunConflict(
            f"run {run.pk} cannot be retried: run {occupant} already occupies sub-group "
            f"{run.sub_group_key!r} of {run.reduction_step}"
        )
    budget = run.retry_count + 1 + run.reduction_step.max_retries
    try:
        return _back_to_pending(
            run,
            actor=actor,
            reason=reason or "manual retry",
            updates={"max_retries": budget, "triggered_by": run.triggered_by},
        )
    except IntegrityError as exc:
        raise RunConflict(
            f"run {run.pk} cannot be retried: its sub-group {run.sub_group_key!r} is occupied"
        ) from exc
    except TransitionConflict as exc:
        raise RunConflict(f"run {run.pk} changed while being retried: {exc}") from exc
