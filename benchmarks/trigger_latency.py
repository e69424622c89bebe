"""Trigger -> submission latency: the time from a package becoming ARCHIVED until the first run
of a pipeline over it is SUBMITTED to the local backend, through the real managers and Celery on
PostgreSQL and Redis, next to a raw Celery round trip on the same broker (SPEC §9, issue 11:
target p95 <= 5 s).

The world is the demo facility (``demo_facility_load``) with simulated Prime-Cam scans
(``demo_observations_simulate``) whose packages are planned and built by the packaging services
into the ccat buffer (real tars, real checksums; by default 2 files of 64 KiB per package,
``--files-per-package`` and ``--file-size`` make them larger). Its two demo pipelines
("Prime-Cam 280 GHz maps", "Prime-Cam 350 GHz maps") are CONTINUOUS, calibrate each scan
(``group_by`` executed_obs_unit, cooldown 0) and process at ``cologne:processing``; their
reduction is the shipped demo reduction, run by the local backend.

For each of N packages (default 20), one at a time:

1. before the clock starts, the package's tar is copied into ``cologne:lta`` (the I/O of an
   archive transfer, which this benchmark does not time);
2. the clock starts: in one transaction the archive copy is registered verified
   (``copy_register_verified``) and ``mark_archived`` (pipelines/services/archive.py) moves the
   package to ARCHIVED, exactly the tail of ``long_term_archive_transfer_run``; on commit it
   queues ``evaluate_triggers_now``;
3. from there on only Celery and the managers act: the evaluation creates the PENDING run and
   ticks the workflow manager (claim, StagingJob, staging dispatch), ``stage_data_task`` copies
   the tar from the archive to the processing location, unpacks and verifies it and queues a
   workflow tick, which dispatches ``submit_run``, which submits to the local backend;
4. the script waits for the run's ``submitted_at``, then for every run to end (the reduction and
   the downstream "combine" run it triggers), then pauses ``--pause`` seconds, so the next
   package is measured on a quiet worker.

The Celery worker runs in this process (``pipelines.runner.embedded_worker``, thread pool, as
``facility run`` and benchmarks/workflow_overhead.py use it) on the workflow, managers and
cologne queues. Beat is replaced by a safety ticker thread that runs the trigger, workflow,
staging and result managers every ``--safety-tick`` seconds (default the beat interval,
``WORKFLOW_MANAGER_INTERVAL``, 60 s); the table says how many measurements had such a tick in
their window, so a figure that depended on a tick is visible.

Times come from the database: ``archived_at`` (set by ``mark_archived``), the run's
``created_at``, its STAGING_DATA StateEvent (claimed), the StagingJob's COMPLETED StateEvent
(staging done), ``submitted_at`` and its SUBMITTED StateEvent (they agree to the millisecond).

Baseline: ``--round-trips`` (default 50) raw Celery round trips on the same broker and worker: a
no-op task is sent, its body pushes its result onto a Redis list, the sender blocks on that list.

    .venv/bin/python benchmarks/trigger_latency.py [--packages 20] [--pause 2]
        [--safety-tick 60] [--timeout 900] [--round-trips 50]
        [--files-per-package 2] [--file-size 65536]

Needs PostgreSQL on 127.0.0.1:5432 (database ``bench_latency``, created and dropped) and Redis
on 127.0.0.1:6379 (DB 11 as broker, flushed before and after). Stops by itself after the N
packages or ``--timeout`` seconds, whichever comes first. Prints a table and exits; not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import _django
from _django import django_environment, machine_line

# Our own Redis DB (issue 11's benchmarks: DB 11), set before _django configures Celery with it.
_django.BROKER_URL = "redis://127.0.0.1:6379/11"
DATABASE = "bench_latency"
PRIMECAM = "Prime-Cam"
ARCHIVE = ("cologne", "lta")


@dataclass
class Sample:
    package: str
    archived: datetime
    created: datetime
    claimed: datetime
    staged: datetime
    submitted: datetime
    submitted_event: datetime
    safety_ticks: int

    def seconds(self, a: datetime, b: datetime) -> float:
        return (b - a).total_seconds()


def build_packages(count: int, *, files: int, file_size: int) -> list[int]:
    """``count`` built Prime-Cam packages in the ccat buffer (WAITING, tar written and hashed),
    with their tars already copied into the archive. Returns their ids in the order to archive."""
    from pipelines.demo.facility import demo_facility_load
    from pipelines.demo.simulate import demo_observations_simulate
    from pipelines.models import DataLocation, RawDataFile, RawDataPackage
    from pipelines.services.operations import operation_claim_batch
    from pipelines.services.packaging import raw_data_package_build, raw_data_packages_plan
    from pipelines.storage.base import copy, storage_for

    demo_facility_load()
    # Each Prime-Cam scan makes two packages (280 and 350 GHz), one per demo pipeline; scans are
    # drawn from all demo obs units, so simulate until there are enough Prime-Cam ones.
    scans = 0
    while True:
        scans += max(count, 4)
        demo_observations_simulate(count=scans, files_per_module=files, file_size=file_size)
        groups = (
            RawDataFile.objects.filter(instrument_module__instrument__name=PRIMECAM)
            .values("executed_obs_unit_id", "instrument_module_id")
            .distinct()
            .count()
        )
        if groups >= count or scans > 50 * count:
            break
    raw_data_packages_plan()
    wanted = RawDataPackage.objects.due().filter(instrument_module__instrument__name=PRIMECAM)
    claim = operation_claim_batch(
        RawDataPackage,
        owner="bench-latency",
        limit=count,
        queryset=wanted.order_by("created_at", "pk"),
    )
    if len(claim.ids) < count:
        raise SystemExit(f"only {len(claim.ids)} Prime-Cam packages for --packages {count}")
    archive = DataLocation.objects.get(site__short_name=ARCHIVE[0], name=ARCHIVE[1])
    for pk in claim.ids:
        package = raw_data_package_build(pk, token=claim.token, owner="bench-latency")
        assert package.origin_location is not None
        copy(
            storage_for(package.origin_location),
            package.relative_path,
            storage_for(archive),
            package.relative_path,
            algorithm=package.checksum_algorithm,
        )
    return sorted(claim.ids)


def archive(package_id: int) -> None:
    """The tail of ``long_term_archive_transfer_run``: register the verified archive copy and mark
    the package ARCHIVED in one transaction (which queues the trigger evaluation on commit)."""
    from django.db import transaction

    from pipelines.models import DataLocation, PhysicalCopy, RawDataPackage
    from pipelines.services.archive import mark_archived
    from pipelines.services.copies import copy_register_verified

    package = RawDataPackage.objects.get(pk=package_id)
    location = DataLocation.objects.get(site__short_name=ARCHIVE[0], name=ARCHIVE[1])
    with transaction.atomic():
        copy_register_verified(
            package,
            kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
            location=location,
            relative_path=package.relative_path,
            checksum=package.checksum,
            actor="bench-latency",
            reason="benchmark: archive copy written before the clock started",
        )
        mark_archived(package, actor="bench-latency", where=f"{location}")


def wait_for_submission(package_id: int, timeout: float) -> Any:
    """The first run over the package once it has ``submitted_at``; SystemExit on failure."""
    from pipelines.models import ExecutedReductionStep, RunStatus

    deadline = time.monotonic() + timeout
    while True:
        run = (
            ExecutedReductionStep.objects.filter(input_raw_packages=package_id)
            .order_by("created_at", "pk")
            .first()
        )
        if run is not None and run.submitted_at is not None:
            return run
        if run is not None and run.status == RunStatus.FAILED:
            raise SystemExit(f"run {run.pk} failed before submission: {run.failure_reason}")
        if time.monotonic() > deadline:
            state = "no run" if run is None else f"run {run.pk} {run.status}"
            raise SystemExit(f"package {package_id}: not submitted after {timeout:g}s ({state})")
        time.sleep(0.02)


def wait_until_quiet(timeout: float) -> bool:
    """Wait until no run is live (the reduction and the downstream runs it triggers ended).
    Returns False when ``timeout`` passed first."""
    from pipelines.models import ExecutedReductionStep, RunStatus

    live = [
        RunStatus.PENDING,
        RunStatus.STAGING_DATA,
        RunStatus.SUBMITTED,
        RunStatus.RUNNING,
        RunStatus.COLLECTING_RESULTS,
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not ExecutedReductionStep.objects.filter(status__in=live).exists():
            return True
        time.sleep(0.2)
    return False


def event_time(instance: Any, to_state: str, field: str = "status") -> datetime:
    from pipelines.models import StateEvent

    event = (
        StateEvent.objects.for_object(instance)
        .filter(field=field, to_state=to_state)
        .order_by("created_at", "pk")
        .first()
    )
    if event is None:
        raise SystemExit(f"{instance!r} has no StateEvent to {to_state}")
    return event.created_at


def sample_of(package_id: int, run: Any, ticks: int) -> Sample:
    from pipelines.models import PackageState, RawDataPackage, RunStatus, Status

    package = RawDataPackage.objects.get(pk=package_id)
    assert package.archived_at is not None and run.staging_job is not None
    archived_event = event_time(package, PackageState.ARCHIVED, field="state")
    # archived_at is set in the same transaction as its event; both precede the commit.
    return Sample(
        package=package.name,
        archived=min(package.archived_at, archived_event),
        created=run.created_at,
        claimed=event_time(run, RunStatus.STAGING_DATA),
        staged=event_time(run.staging_job, Status.COMPLETED),
        submitted=run.submitted_at,
        submitted_event=event_time(run, RunStatus.SUBMITTED),
        safety_ticks=ticks,
    )


def measure_engine(args: argparse.Namespace, package_ids: list[int]) -> tuple[list[Sample], str]:
    from django.db import connection

    from pipelines.managers import manager_tick
    from pipelines.models import ExecutedReductionStep
    from pipelines.queues import DEFAULT_QUEUE, MANAGERS_QUEUE, discover_queues
    from pipelines.runner import embedded_worker

    stop = threading.Event()
    tick_times: list[float] = []

    def safety() -> None:
        try:
            while not stop.wait(args.safety_tick):
                tick_times.append(time.monotonic())
                for name in ("trigger", "workflow", "staging", "result"):
                    manager_tick(name, owner="bench-beat")
        finally:
            connection.close()

    queues = sorted(
        {*discover_queues(site="cologne", include_workflow=True), MANAGERS_QUEUE, DEFAULT_QUEUE}
    )
    samples: list[Sample] = []
    ended = "all packages measured"
    began = time.monotonic()
    with embedded_worker(queues, concurrency=2):
        time.sleep(1.0)  # the worker connects to the broker
        ticker = threading.Thread(target=safety, daemon=True)
        ticker.start()
        try:
            for index, package_id in enumerate(package_ids):
                left = args.timeout - (time.monotonic() - began)
                if left <= 0:
                    ended = f"--timeout {args.timeout:g}s reached after {index} packages"
                    break
                start = time.monotonic()
                archive(package_id)
                run = wait_for_submission(package_id, timeout=min(left, 120.0))
                window = time.monotonic()
                ticks = sum(start <= t <= window for t in tick_times)
                samples.append(sample_of(package_id, run, ticks))
                s = samples[-1]
                print(
                    f"#  {index + 1:>3}/{len(package_ids)} run {run.pk}: "
                    f"{s.seconds(s.archived, s.submitted):.3f} s"
                )
                if not wait_until_quiet(min(args.timeout - (time.monotonic() - began), 300.0)):
                    live = ExecutedReductionStep.objects.exclude(
                        status__in=("completed", "failed", "cancelled")
                    ).count()
                    ended = f"stopped: {live} run(s) still live after package {index + 1}"
                    break
                time.sleep(args.pause)
        finally:
            stop.set()
            ticker.join(args.safety_tick + 60)
    return samples, ended


def measure_round_trips(count: int) -> list[float]:
    """``count`` raw Celery round trips: send a no-op task, its body pushes its result onto a
    Redis list of the same DB, the sender blocks on that list."""
    import redis

    from pipelines.queues import DEFAULT_QUEUE
    from pipelines.runner import embedded_worker
    from workflow_site.celery import app

    client = redis.Redis.from_url(_django.BROKER_URL)
    key = f"bench-latency:{uuid.uuid4().hex}"

    @app.task(name="benchmarks.trigger_latency.noop")
    def noop(reply_to: str, token: int) -> None:
        redis.Redis.from_url(_django.BROKER_URL).rpush(reply_to, token)

    times: list[float] = []
    with embedded_worker([DEFAULT_QUEUE], concurrency=2):
        time.sleep(1.0)
        for token in range(count + 3):  # the first three warm the connections, not counted
            began = time.perf_counter()
            noop.apply_async(args=(key, token), queue=DEFAULT_QUEUE)
            reply = client.blpop([key], timeout=30)
            if reply is None:
                raise SystemExit("a Celery round trip did not come back in 30 s")
            if int(reply[1]) != token:
                raise SystemExit(f"round trip {token} answered by {reply[1]!r}")
            if token >= 3:
                times.append(time.perf_counter() - began)
            time.sleep(0.05)
    return times


def run_summary() -> str:
    """What became of every run (the measured ones and the downstream runs they triggered)."""
    from django.db.models import Count

    from pipelines.models import ExecutedReductionStep

    rows = (
        ExecutedReductionStep.objects.values("reduction_step__name", "status")
        .annotate(n=Count("id"))
        .order_by("reduction_step__name", "status")
    )
    return ", ".join(f"{r['reduction_step__name']}: {r['status']} {r['n']}" for r in rows)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 20 samples p95 is the 19th)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def row(name: str, values: list[float]) -> str:
    return (
        f"{name:<44} {percentile(values, 50) * 1000:>9.0f} "
        f"{percentile(values, 95) * 1000:>9.0f} {max(values) * 1000:>9.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", type=int, default=20)
    parser.add_argument("--pause", type=float, default=2.0)
    parser.add_argument("--safety-tick", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--round-trips", type=int, default=50)
    parser.add_argument("--files-per-package", type=int, default=2)
    parser.add_argument("--file-size", type=int, default=64 * 1024, help="bytes per raw file")
    args = parser.parse_args()
    if args.packages < 1 or args.round_trips < 1 or args.files_per_package < 1:
        parser.error("--packages, --round-trips and --files-per-package must be at least 1")
    if args.file_size < 1:
        parser.error("--file-size must be at least 1 byte")
    if (
        args.pause < 0
        or args.timeout <= 0
        or (args.safety_tick is not None and args.safety_tick <= 0)
    ):
        parser.error("--pause must not be negative; --timeout and --safety-tick must be positive")
    print(
        f"# {machine_line()}; {args.packages} packages of {args.files_per_package} files of "
        f"{args.file_size} bytes"
    )
    # Task lines at INFO would time the terminal, not the engine.
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    with django_environment("trigger-latency", postgres_db=DATABASE):
        from django.conf import settings
        from django.core.management import call_command

        call_command("createcachetable", verbosity=0)
        if args.safety_tick is None:
            args.safety_tick = float(settings.WORKFLOW_MANAGER_INTERVAL)
        started = time.perf_counter()
        package_ids = build_packages(
            args.packages, files=args.files_per_package, file_size=args.file_size
        )
        print(f"# built {len(package_ids)} packages in {time.perf_counter() - started:.1f} s")
        samples, ended = measure_engine(args, package_ids)
        round_trips = measure_round_trips(args.round_trips)
        runs = run_summary()
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if not samples:
        raise SystemExit(f"no package measured ({ended})")
    print(f"# {ended}; safety tick every {args.safety_tick:g} s; load average {load} at the end")
    skew = max(abs(s.seconds(s.submitted, s.submitted_event)) for s in samples)
    print(f"# submitted_at vs SUBMITTED StateEvent: at most {skew * 1000:.1f} ms apart")
    print(f"# runs at the end (step: status count): {runs}")
    print(f"{'ms':<44} {'p50':>9} {'p95':>9} {'max':>9}")
    segments = (
        ("archived -> submitted (total)", lambda s: s.seconds(s.archived, s.submitted)),
        ("  archived -> run created", lambda s: s.seconds(s.archived, s.created)),
        ("  run created -> claimed (STAGING_DATA)", lambda s: s.seconds(s.created, s.claimed)),
        ("  claimed -> staging done", lambda s: s.seconds(s.claimed, s.staged)),
        ("  staging done -> submitted", lambda s: s.seconds(s.staged, s.submitted)),
    )
    for name, value in segments:
        print(row(name, [value(s) for s in samples]))
    print(row(f"raw Celery round trip (n={len(round_trips)})", round_trips))
    with_ticks = sum(1 for s in samples if s.safety_ticks)
    print(
        f"# {len(samples)} packages measured; {with_ticks} had a safety tick in their window; "
        f"mean total {statistics.mean(s.seconds(s.archived, s.submitted) for s in samples):.3f} s"
    )


if __name__ == "__main__":
    main()
