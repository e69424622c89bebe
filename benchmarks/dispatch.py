"""Dispatch throughput of a manager (claim + enqueue) against raw Celery no-op publishing.

SPEC §9: a manager's dispatch throughput must be >= 30% of raw Celery no-op throughput measured
in the same run. Both sides publish the same number of messages to the same Redis broker
(``redis://127.0.0.1:6379/9``) through the project's Celery app; no worker consumes, so this is
publishing throughput, and each queue is counted (every message arrived) and purged after each
run. The messages have the same shape: one positional id and a 32-hex ``claim_token``.

- baseline: ``noop.apply_async(args=[i], kwargs={"claim_token": ...}, queue=...)`` N times, a
  trivial task registered by this script;
- claim + dispatch: N pending RawDataPackage rows claimed with ``operation_claim_batch`` in
  batches of 100, each batch enqueued with ``operation_dispatch`` on the real
  ``pipelines.tasks.build_raw_data_package`` task (the queue of the row's source location);
- manager tick: the same N rows through ``packaging_manager_tick(limit=100)`` until it claims
  nothing (adds the planning query, the per-batch source-location lookup and queue naming).

    .venv/bin/python benchmarks/dispatch.py [--rows 5000] [--runs 5] [--batch 100] [--profile]

Uses its own PostgreSQL database ``bench_dispatch`` (dropped at the end) and Redis DB 9
(flushed at the end). Prints a table and exits; not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import secrets
import statistics
import time
import uuid
from collections.abc import Callable

from _django import django_environment, machine_line

DB_NAME = "bench_dispatch"
NOOP_QUEUE = "bench_noop"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="messages / rows per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100, help="rows per claim")
    parser.add_argument("--profile", action="store_true", help="cProfile one claim+dispatch run")
    args = parser.parse_args()
    header = machine_line()
    with django_environment("dispatch", postgres_db=DB_NAME):
        run(args, header)


def run(args: argparse.Namespace, header: str) -> None:
    import redis
    from django.db import transaction

    from pipelines.demo.facility import demo_facility_load
    from pipelines.models import (
        DataLocation,
        ExecutedObsUnit,
        InstrumentModule,
        ObsUnit,
        RawDataFile,
        RawDataPackage,
    )
    from pipelines.queues import OperationType, queue_name
    from pipelines.services.operations import operation_claim_batch, operation_dispatch
    from pipelines.services.packaging import packaging_manager_tick
    from pipelines.tasks import build_raw_data_package
    from workflow_site.celery import app

    @app.task(name="benchmarks.noop")
    def noop(*_args: object, **_kwargs: object) -> None:
        return None

    broker = redis.Redis.from_url(app.conf.broker_url)
    demo_facility_load()
    source = DataLocation.objects.select_related("site").get(
        site__short_name="ccat", name="chai_raw_data"
    )
    module = InstrumentModule.objects.get(instrument__name="CHAI", name="LFA")
    scan = ExecutedObsUnit.objects.create(
        obs_unit=ObsUnit.objects.order_by("pk").first(),
        start_time="2026-01-01T00:00:00Z",
        end_time="2026-01-01T01:00:00Z",
        status=ExecutedObsUnit.ObsStatus.COMPLETED,
    )
    build_queue = queue_name(source, OperationType.RAW_DATA_PACKAGE_CREATION)
    serial = iter(range(10**9))

    def make_pending(n: int, *, with_files: bool) -> None:
        """n new pending packages (and, for the manager tick, one file each so it can route)."""
        with transaction.atomic():
            batch = next(serial)
            packages = RawDataPackage.objects.bulk_create(
                RawDataPackage(
                    name=f"bench_{batch}_{i:07d}.tar",
                    relative_path=f"raw_data_packages/bench_{batch}_{i:07d}.tar",
                    executed_obs_unit=scan,
                    instrument_module=module,
                )
                for i in range(n)
            )
            if with_files:
                RawDataFile.objects.bulk_create(
                    (
                        RawDataFile(
                            id=uuid.uuid4(),
                            name=f"f{i}.fits",
                            relative_path=f"raw/{batch}/f{i}.fits",
                            size=1,
                            checksum="0" * 64,
                            executed_obs_unit=scan,
                            instrument_module=module,
                            source_location=source,
                            raw_data_package=package,
                        )
                        for i, package in enumerate(packages)
                    ),
                    batch_size=2000,
                )

    def queued(queue: str) -> int:
        return sum(
            broker.llen(key) for key in broker.keys(f"{queue}*") if broker.type(key) == b"list"
        )

    def purge(queue: str) -> None:
        keys = [key for key in broker.keys(f"{queue}*") if broker.type(key) == b"list"]
        if keys:
            broker.delete(*keys)

    def baseline() -> None:
        token = secrets.token_hex(16)
        for i in range(args.rows):
            noop.apply_async(args=[i], kwargs={"claim_token": token}, queue=NOOP_QUEUE)

    def claim_and_dispatch() -> None:
        while True:
            claim = operation_claim_batch(RawDataPackage, owner="bench", limit=args.batch)
            if not claim.ids:
                return
            operation_dispatch(
                build_raw_data_package, claim.token, dict.fromkeys(claim.ids, build_queue)
            )

    def manager_ticks() -> None:
        while packaging_manager_tick(owner="bench", limit=args.batch)["claimed"]:
            pass

    def timed(fn: Callable[[], None], queue: str, setup: Callable[[], None] | None) -> float:
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        got = queued(queue)
        purge(queue)
        if got != args.rows:
            raise SystemExit(f"{queue}: {got} messages queued, expected {args.rows}")
        return seconds

    sides: dict[str, tuple[Callable[[], None], str, Callable[[], None] | None]] = {
        "noop.apply_async (baseline)": (baseline, NOOP_QUEUE, None),
        "claim_batch + dispatch": (
            claim_and_dispatch,
            build_queue,
            lambda: make_pending(args.rows, with_files=False),
        ),
        "packaging_manager_tick": (
            manager_ticks,
            build_queue,
            lambda: make_pending(args.rows, with_files=True),
        ),
    }
    # Warm-up: broker connection, producer pool, queue declarations, query plans.
    saved = args.rows
    args.rows = 200
    for fn, queue, setup in sides.values():
        timed(fn, queue, setup)
    args.rows = saved

    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for run_index in range(args.runs):
        # Interleaved and rotated, so load changes and order effects hit every side alike.
        shift = run_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, queue, setup = sides[name]
            times[name].append(timed(fn, queue, setup))

    print(
        f"{args.rows} messages per run, claims of {args.batch}, median of {args.runs} runs, "
        f"PostgreSQL + Redis broker on localhost, no worker consuming; {header}"
    )
    base = args.rows / statistics.median(times["noop.apply_async (baseline)"])
    print(f"{'what':30} {'seconds':>8} {'rows/s':>8} {'ms/row':>7}  ratio")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        rate = args.rows / seconds
        note = (
            "baseline" if name.endswith("(baseline)") else f"{rate / base:.2f} x (target >= 0.30)"
        )
        print(f"{name:30} {seconds:8.3f} {rate:8.0f} {seconds / args.rows * 1e3:7.3f}  {note}")
    print(
        "runs (s): "
        + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in s)}" for n, s in times.items())
    )

    if args.profile:
        make_pending(args.rows, with_files=False)
        profiler = cProfile.Profile()
        profiler.enable()
        claim_and_dispatch()
        profiler.disable()
        purge(build_queue)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
