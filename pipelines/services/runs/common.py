"""What the workflow manager, the submission worker and the failure and operator moves share:
the constants, the two exceptions, which runs this instance serves, leases and attempt
entries."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone

from pipelines.exceptions import NonRetryableError
from pipelines.models import (
    ACTIVE_RUN_STATUSES,
    ExecutedReductionStep,
    RunStatus,
    Status,
)

from ..operations import ClaimLost
from ..states import TransitionConflict

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)
alerts = logging.getLogger("pipelines.alerts")

_CLEAR_LEASE: dict[str, Any] = {"lease_owner": "", "lease_expires_at": None, "claim_token": ""}
_MESSAGE_LIMIT = 5000
# Staging jobs a run may wait for or reuse: not failed, and still protecting their copies.
LIVE_STAGING = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS, Status.COMPLETED)
# A run that still needs its staged inputs: active, or failed and awaiting its retry.
_NEEDS_INPUTS = Q(status__in=ACTIVE_RUN_STATUSES) | Q(
    status=RunStatus.FAILED, failed_for_good=False
)
SUBMIT_MARK = "submit:"
DEFAULT_RESOURCES = {"cpu": 1, "memory_gb": 1, "time_hours": 1}


class RunConflict(TransitionConflict):
    """The operator's move does not apply to the run as it is (a cancel of a run that is not
    pending, submitted or running; a retry of a run that has not failed, or whose sub-group
    another run occupies). Nothing was changed. The API answers it with HTTP 409."""


class CorruptInput(NonRetryableError):
    """A staged input (or an upstream product) does not match its registered checksum: the run
    must not run on it, and running it again will not help until the copy is repaired."""


# --- which runs this instance serves -------------------------------------------------------------
def served_runs() -> QuerySet[ExecutedReductionStep]:
    """Runs of the pipelines this instance serves: those of the processing location
    ``triggers.processing_location_id()`` names, every pipeline's when it names none (the
    embedded facility serves all of its processing sites). The three managers agree on it."""
    from ..triggers import processing_location_id

    runs = ExecutedReductionStep.objects.all()
    location_id = processing_location_id()
    if location_id:
        runs = runs.filter(reduction_step__pipeline__processing_location_id=location_id)
    return runs


def job_name(run: ExecutedReductionStep) -> str:
    """The backend job name of the run's current attempt; backends find a job by it."""
    return f"run-{run.pk}-{run.attempt}"


def run_lease_expiry(seconds: int | None = None) -> Any:
    return timezone.now() + timedelta(seconds=seconds or settings.WORKFLOW_LEASE_SECONDS)


def run_renew_leases(
    ids: list[int], *, token: str, statuses: list[str], seconds: int | None = None
) -> int:
    """Push the lease of the runs among ``ids`` still held by ``token`` in one of ``statuses``.
    Not a state move (no event). Returns how many were renewed."""
    if not token or not ids:
        return 0
    return ExecutedReductionStep.objects.filter(
        pk__in=ids, claim_token=token, status__in=statuses
    ).update(lease_expires_at=run_lease_expiry(seconds), updated_at=timezone.now())


class RunLeaseKeeper:
    """Renews a claimed run's lease from a background thread while its worker does I/O, every
    third of the lease period; ``check()`` raises ``ClaimLost`` once a renewal finds the claim
    gone (the run was recovered and claimed again), so the worker stops instead of racing."""

    def __init__(self, pk: int, *, token: str, status: str, seconds: int | None = None) -> None:
        self.pk = pk
        self.token = token
        self.status = status
        self.seconds = seconds or settings.WORKFLOW_LEASE_SECONDS
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-run-{pk}", daemon=True)

    def __enter__(self) -> RunLeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.seconds)

    def check(self) -> None:
        if self.lost.is_set():
            raise ClaimLost(f"run {self.pk}: lease lost during the work; stopping")

    def _run(self) -> None:
        from django.db import connection

        try:
            while not self._stop.wait(max(self.seconds / 3, 0.2)):
                try:
                    held = run_renew_leases(
                        [self.pk], token=self.token, statuses=[self.status], seconds=self.seconds
                    )
                except Exception:
                    log.warning("lease renewal of run %s failed", self.pk, exc_info=True)
                    connection.close()
                    continue
                if not held:
                    self.lost.set()
                    return
        finally:
            connection.close()


def _allowed(status: str) -> set[str]:
    return ExecutedReductionStep.TRANSITIONS["status"].get(status, set())


def attempt_entry(run: ExecutedReductionStep, *, outcome: str, **values: Any) -> dict[str, Any]:
    """One line of ``run.attempts``: the attempt, its job, when, how it ended."""
    entry: dict[str, Any] = {
        "attempt": run.attempt,
        "job_id": run.hpc_job_id,
        "run_dir": run.run_dir,
        "submitted_at": run.submitted_at.isoformat() if run.submitted_at else None,
        "ended_at": timezone.now().isoformat(),
        "outcome": outcome,
    }
    for key, value in values.items():
        if isinstance(value, str | int | float | bool) or value is None:
            entry[key] = value
    return entry


def run_stages_raw_data(run: ExecutedReductionStep) -> bool:
    """Whether the run's raw packages are staged for it: always for a step without upstream
    steps (raw data is all it has), else as its step says (``ReductionStep.stages_raw_data``;
    a combine step that reads only its upstream products needs none)."""
    step = run.reduction_step
    return step.stages_raw_data or not step.depends_on.exists()
