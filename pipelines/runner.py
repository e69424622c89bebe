"""The embedded facility (``manage.py facility run``): a Celery worker for every queue and the
managers ticked on a schedule, in one process, on whatever database and broker the settings name
(SQLite and the file-system broker by default).

In production beat fires the managers (``CELERY_BEAT_SCHEDULE``) and workers run on many hosts.
Here the runner plays beat itself, calling each manager's tick in turn, because it needs each
tick's answer: ``--until-idle`` ends once a whole round of ticks found no work and no operation
row is unfinished. The worker tasks go through the real broker to a real worker, exactly as in
production.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import close_old_connections
from django.db.models import Q

from pipelines.managers import MANAGERS, manager_tick
from pipelines.models import ACTIVE_RUN_STATUSES, ExecutedReductionStep, RunStatus, Status
from pipelines.services.recovery import OPERATION_MODELS, recover_expired_leases

log = logging.getLogger(__name__)


LIVE = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)


def unfinished_operations() -> dict[str, int]:
    """Rows of every operation table (and phase) that are pending, scheduled or in progress,
    and reduction runs that are active or await their retry: {"raw_data_package": 2,
    "data_transfer.unpack_status": 1, "executed_reduction_step": 3, ...}, non-zero only."""
    left: dict[str, int] = {}
    for model in OPERATION_MODELS:
        for name, phase in model.PHASES.items():
            count = model.objects.filter(**{f"{name}__in": LIVE}, **phase.requires).count()
            if count:
                key = model._meta.db_table if name == "status" else f"{model._meta.db_table}.{name}"
                left[key] = count
    # Reduction runs (issue 11): a run whose job still runs is unfinished work, and so is a
    # failed run awaiting its retry; the managers have nothing to tick while a job runs.
    runs = ExecutedReductionStep.objects.filter(
        Q(status__in=ACTIVE_RUN_STATUSES) | Q(status=RunStatus.FAILED, failed_for_good=False)
    ).count()
    if runs:
        left[ExecutedReductionStep._meta.db_table] = runs
    return left


def failed_operations() -> dict[str, int]:
    failed: dict[str, int] = {}
    for model in OPERATION_MODELS:
        for name in model.PHASES:
            count = model.objects.filter(**{name: Status.FAILED}).count()
            if count:
                key = model._meta.db_table if name == "status" else f"{model._meta.db_table}.{name}"
                failed[key] = count
    runs = ExecutedReductionStep.objects.filter(status=RunStatus.FAILED).count()
    if runs:
        failed[ExecutedReductionStep._meta.db_table] = runs
    return failed


@dataclass
class Round:
    """One round of manager ticks."""

    number: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def found_work(self) -> bool:
        return bool(self.errors) or any(any(c.values()) for c in self.counts.values())

    def describe(self) -> str:
        parts = []
        for name, counts in self.counts.items():
            busy = {k: v for k, v in counts.items() if v}
            if busy:
                parts.append(f"{name} " + " ".join(f"{k}={v}" for k, v in busy.items()))
        parts += [f"{name} FAILED: {error}" for name, error in self.errors.items()]
        return "; ".join(parts) or "no work"


def tick_round(number: int, *, owner: str) -> Round:
    """Tick every manager once, then the lease reconciler. A manager that raises is reported in
    the round and does not stop the others."""
    result = Round(number)
    # Once per round, not per manager: with CONN_MAX_AGE=0 every call reopens the database.
    close_old_connections()
    for name in MANAGERS:
        try:
            result.counts[name] = manager_tick(name, owner=owner)
        except Exception as exc:
            log.exception("manager %s failed", name)
            result.errors[name] = f"{type(exc).__name__}: {exc}"
    try:
        result.counts["recovery"] = recover_expired_leases()
    except Exception as exc:
        log.exception("lease recovery failed")
        result.errors["recovery"] = f"{type(exc).__name__}: {exc}"
    return result


@contextmanager
def embedded_worker(
    queues: list[str], *, concurrency: int = 2, loglevel: str = "WARNING"
) -> Iterator[Any]:
    """A Celery worker of the project app on ``queues`` (thread pool) in a background thread of
    this process, stopped when the block ends: warm (running tasks finish) within ``grace``,
    else cold (acks are late, so an interrupted task is delivered again)."""
    from celery.worker import WorkController
    from celery.worker import state as worker_state

    from workflow_site.celery import app

    app.finalize()
    hostname = f"facility-{uuid.uuid4().hex[:8]}@localhost"
    worker = WorkController(
        app=app,
        hostname=hostname,
        pool="threads",
        concurrency=concurrency,
        loglevel=loglevel,
        logfile=None,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        queues=queues,
    )
    thread = threading.Thread(target=worker.start, name="facility-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        # Celery's worker loop polls these module globals (its own signal handlers set them).
        state: Any = worker_state
        state.should_stop = 0
        thread.join(timeout=60)
        if thread.is_alive():
            state.should_terminate = 0
            thread.join(timeout=10)
        state.should_stop = None
        state.should_terminate = None


@dataclass
class RunResult:
    idle: bool
    rounds: int
    left: dict[str, int]
    failed: dict[str, int]
    seconds: float

    def summary(self) -> str:
        state = "idle" if self.idle else "stopped with work left"
        left = ", ".join(f"{k}: {v}" for k, v in self.left.items()) or "none"
        failed = ", ".join(f"{k}: {v}" for k, v in self.failed.items()) or "none"
        return (
            f"facility {state} after {self.rounds} round(s) in {self.seconds:.1f}s; "
            f"unfinished: {left}; failed: {failed}"
        )


def run_facility(
    *,
    tick: float,
    until_idle: bool,
    timeout: float | None,
    report: Callable[[Round, dict[str, int]], None],
    stop: threading.Event | None = None,
    owner: str = "facility-runner",
) -> RunResult:
    """Tick the managers every ``tick`` seconds until idle (with ``until_idle``), until
    ``timeout`` seconds have passed, or until ``stop`` is set. ``report`` sees every round and
    what is unfinished after it. Idle: no operation row was unfinished before the round, the
    round found no work, and none is unfinished after it."""
    started = time.monotonic()
    stop = stop or threading.Event()
    number = 0
    left: dict[str, int] = {}
    idle = False
    while True:
        number += 1
        # Work a worker finishes during a round is planned onward only by the next round's
        # managers, so "idle" needs nothing unfinished before the round as well as after it.
        before = unfinished_operations()
        this = tick_round(number, owner=owner)
        left = unfinished_operations()
        report(this, left)
        if until_idle and not before and not this.found_work and not left:
            idle = True
            break
        if timeout is not None and time.monotonic() - started >= timeout:
            break
        if stop.wait(tick):
            break
    return RunResult(
        idle=idle,
        rounds=number,
        left=left,
        failed=failed_operations(),
        seconds=time.monotonic() - started,
    )
