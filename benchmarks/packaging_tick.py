"""One packaging manager tick over a large backlog of unpackaged raw files in PostgreSQL.

SPEC §9: a manager tick must take well under its interval (< 50% of it; the trigger manager's
target is stated for 10^6 rows and 10^4 groupings, with one SQL query per grouping) and its
memory must be bounded (it streams rows; no full-table loads). This script loads ``--files``
RawDataFile rows (default 10^6) spread over ``--scans`` finished scans x 2 CHAI modules of the
demo facility with COPY, then measures, each on a fresh slice of the backlog:

- ``raw_data_packages_plan()`` alone (default ``max_groups=200``);
- a full ``packaging_manager_tick()`` (plan + claim of 100 pending packages + enqueue on the
  Redis broker, DB 9, purged after);

reporting wall time, SQL statements (through ``connection.execute_wrapper``; savepoints counted
apart), the slowest statement, the tracemalloc peak (a separate tick, since tracing slows
Python down) and the process's max RSS before and after. ``--explain`` prints the plan of the
group query, ``--profile`` a cProfile of one more planning tick.

    .venv/bin/python benchmarks/packaging_tick.py [--files 1000000] [--scans 10000] [--explain]

Uses its own PostgreSQL database ``bench_packaging`` (dropped at the end). Prints a table and
exits; not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import pstats
import resource
import statistics
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from _django import django_environment, machine_line

DB_NAME = "bench_packaging"
COPY_CHUNK = 100_000
COMPARE_INTERVAL = 60.0
RUNNER_INTERVAL = 2.0  # `manage.py facility run --tick` default


@dataclass
class SqlLog:
    """Every statement the wrapped block sent: kind counts and the slowest ones."""

    kinds: Counter[str] = field(default_factory=Counter)
    timings: list[tuple[float, str]] = field(default_factory=list)

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.timings.append((time.perf_counter() - start, sql))
            self.kinds[sql.lstrip().split(None, 1)[0].upper()] += 1

    @property
    def statements(self) -> int:
        return sum(n for kind, n in self.kinds.items() if kind not in ("SAVEPOINT", "RELEASE"))

    @property
    def savepoints(self) -> int:
        return self.kinds["SAVEPOINT"] + self.kinds["RELEASE"]

    def slowest(self) -> tuple[float, str]:
        return max(self.timings, default=(0.0, ""))

    def sql_seconds(self) -> float:
        return sum(t for t, _ in self.timings)


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--scans", type=int, default=10_000)
    parser.add_argument("--max-groups", type=int, default=200, help="raw_data_packages_plan's")
    parser.add_argument("--ticks", type=int, default=3, help="untraced ticks of each kind")
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the group query")
    parser.add_argument("--profile", action="store_true", help="cProfile one more planning tick")
    args = parser.parse_args()
    header = machine_line()
    with django_environment("packaging-tick", postgres_db=DB_NAME):
        run(args, header)


def run(args: argparse.Namespace, header: str) -> None:
    import redis
    from django.db import connection
    from django.db.models import Min

    from pipelines.demo.facility import demo_facility_load
    from pipelines.models import (
        DataLocation,
        ExecutedObsUnit,
        InstrumentModule,
        ObsUnit,
        RawDataPackage,
    )
    from pipelines.services import packaging
    from workflow_site.celery import app

    demo_facility_load()
    source = DataLocation.objects.get(site__short_name="ccat", name="chai_raw_data")
    modules = list(InstrumentModule.objects.filter(instrument__name="CHAI").order_by("name"))
    obs_units = list(ObsUnit.objects.order_by("pk"))
    epoch = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    # --- load ---------------------------------------------------------------------------------
    started = time.perf_counter()
    scans = ExecutedObsUnit.objects.bulk_create(
        (
            ExecutedObsUnit(
                id=uuid.uuid4(),
                obs_unit=obs_units[i % len(obs_units)],
                start_time=epoch + dt.timedelta(minutes=10 * i),
                end_time=epoch + dt.timedelta(minutes=10 * i + 5),
                status=ExecutedObsUnit.ObsStatus.COMPLETED,
            )
            for i in range(args.scans)
        ),
        batch_size=2000,
    )
    groups_total = len(scans) * len(modules)
    per_group = args.files // groups_total
    columns = (
        "id, name, relative_path, size, checksum, checksum_algorithm, file_type, "
        "executed_obs_unit_id, instrument_module_id, source_location_id, metadata, "
        "created_at, updated_at"
    )

    def rows() -> Iterator[str]:
        n = 0
        for s, scan in enumerate(scans):
            created = epoch + dt.timedelta(minutes=10 * s)
            for module in modules:
                for k in range(per_group):
                    name = f"{module.name}_{s:05d}_{k:04d}.fits"
                    yield (
                        f"{uuid.uuid4()}\t{name}\traw/{scan.pk}/{module.name}/{name}\t"
                        f"{100_000_000 + k}\t{n:064x}\tsha256\tfits\t{scan.pk}\t{module.pk}\t"
                        f"{source.pk}\t{{}}\t{created.isoformat()}\t{created.isoformat()}\n"
                    )
                    n += 1

    loaded = 0
    with connection.cursor() as cursor:
        raw = cursor.cursor  # the psycopg2 cursor, for copy_expert
        chunk: list[str] = []
        for line in rows():
            chunk.append(line)
            if len(chunk) == COPY_CHUNK:
                raw.copy_expert(
                    f"COPY raw_data_file ({columns}) FROM STDIN", io.StringIO("".join(chunk))
                )
                loaded += len(chunk)
                chunk = []
        if chunk:
            raw.copy_expert(
                f"COPY raw_data_file ({columns}) FROM STDIN", io.StringIO("".join(chunk))
            )
            loaded += len(chunk)
    copy_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE raw_data_file")
        cursor.execute("VACUUM ANALYZE executed_obs_unit")
    analyze_seconds = time.perf_counter() - started
    print(
        f"# loaded {args.scans} finished scans and {loaded} raw files ({groups_total} groups of "
        f"{per_group}) with bulk_create + COPY in {copy_seconds:.1f} s, VACUUM ANALYZE "
        f"{analyze_seconds:.1f} s"
    )

    if args.explain:
        group_query = (
            packaging.get_unpackaged_raw_data_files()
            .filter(executed_obs_unit__status__in=packaging.PACKAGEABLE_SCAN_STATUSES)
            .values("executed_obs_unit_id", "instrument_module_id", "source_location_id")
            .annotate(first=Min("created_at"))
            .order_by("first")[: args.max_groups]
        )
        print(group_query.explain(analyze=True, buffers=True))

    broker = redis.Redis.from_url(app.conf.broker_url)

    # --- measure ------------------------------------------------------------------------------
    results: list[tuple[str, dict[str, Any]]] = []

    def measure(label: str, fn: Callable[[], Any], *, trace: bool) -> None:
        log = SqlLog()
        rss_before = maxrss_mb()
        if trace:
            tracemalloc.start()
        start = time.perf_counter()
        with connection.execute_wrapper(log):
            outcome = fn()
        seconds = time.perf_counter() - start
        peak = 0
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        slow_t, slow_sql = log.slowest()
        results.append(
            (
                label,
                {
                    "seconds": seconds,
                    "sql_seconds": log.sql_seconds(),
                    "statements": log.statements,
                    "savepoints": log.savepoints,
                    "kinds": dict(log.kinds),
                    "slowest": (slow_t, " ".join(slow_sql.split())[:90]),
                    "peak_mb": peak / 1e6,
                    "rss": (rss_before, maxrss_mb()),
                    "outcome": outcome,
                    "traced": trace,
                },
            )
        )

    owner = "bench"
    plan = lambda: packaging.raw_data_packages_plan(max_groups=args.max_groups)  # noqa: E731
    tick = lambda: packaging.packaging_manager_tick(owner=owner)  # noqa: E731
    for i in range(args.ticks):
        measure(f"raw_data_packages_plan #{i + 1}", plan, trace=False)
    measure("raw_data_packages_plan (tracemalloc)", plan, trace=True)
    for i in range(args.ticks):
        measure(f"packaging_manager_tick #{i + 1}", tick, trace=False)
    measure("packaging_manager_tick (tracemalloc)", tick, trace=True)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        plan()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue())
    purged = sum(
        broker.delete(key)
        for key in broker.keys("*raw_data_package_creation*")
        if broker.type(key) == b"list"
    )
    unpackaged = packaging.get_unpackaged_raw_data_files().count()
    packages = RawDataPackage.objects.count()

    # --- report -------------------------------------------------------------------------------
    print(
        f"{loaded} raw files, {args.scans} finished scans x {len(modules)} modules = "
        f"{groups_total} groups of {per_group} files; max_groups={args.max_groups}; "
        f"PostgreSQL 15 on localhost; {header}"
    )
    print(
        f"{'what':40} {'wall s':>7} {'SQL s':>6} {'stmts':>6} {'/group':>6} {'savept':>6} "
        f"{'peak MB':>8} {'maxrss MB':>14}  % of 60 s / 2 s"
    )
    for label, r in results:
        groups = r["outcome"].groups if hasattr(r["outcome"], "groups") else args.max_groups
        peak = f"{r['peak_mb']:8.1f}" if r["traced"] else f"{'-':>8}"
        rss = f"{r['rss'][0]:.0f}->{r['rss'][1]:.0f}"
        share = f"{r['seconds'] / COMPARE_INTERVAL:.1%} / {r['seconds'] / RUNNER_INTERVAL:.0%}"
        print(
            f"{label:40} {r['seconds']:7.2f} {r['sql_seconds']:6.2f} {r['statements']:6d} "
            f"{r['statements'] / max(groups, 1):6.1f} {r['savepoints']:6d} {peak} {rss:>14}  "
            f"{share}"
        )
    for kind in ("raw_data_packages_plan", "packaging_manager_tick"):
        untraced = [r for label, r in results if label.startswith(f"{kind} #")]
        wall = statistics.median(r["seconds"] for r in untraced)
        print(
            f"  {kind}: median {wall:.2f} s of {len(untraced)} untraced ticks "
            f"({wall / COMPARE_INTERVAL:.1%} of 60 s); {untraced[0]['outcome']}; "
            f"statements {untraced[0]['kinds']}"
        )
        slowest = max(r["slowest"] for r in untraced)
        print(f"    slowest statement {slowest[0] * 1e3:.0f} ms: {slowest[1]}")
    ticks = -(-groups_total // args.max_groups)
    print(
        f"after the measured ticks: {unpackaged} files still unpackaged, {packages} packages "
        f"planned, {purged} broker queue(s) purged. The whole backlog of {groups_total} groups "
        f"needs {ticks} ticks to plan at {args.max_groups} groups per tick, and "
        f"{-(-groups_total // 100)} ticks to dispatch at 100 claims per tick."
    )


if __name__ == "__main__":
    main()
