"""Trigger manager ticks over many packages and groupings in PostgreSQL.

Issue 11 target: with 10^6 packages and 10^4 groupings, an incremental tick takes < 50% of the
60 s interval with one query per grouping; the full re-evaluation is reported too. This script
loads ``--packages`` ARCHIVED RawDataPackage rows (COPY) in scans of ``--per-scan`` packages,
spread over ``--groupings`` sources; one DataGrouping per source (rules: Source.name eq, state
eq archived) and one CONTINUOUS pipeline per grouping with a per-scan step ("calibrate",
group_by executed_obs_unit); every second pipeline also has a combined step ("combine",
group_by [], depends on calibrate). Every sub-group already has a COMPLETED run covering it
(COPY), so the steady state is "nothing to do", as in production. Then it measures:

1. incremental ticks with no change (the common case);
2. an incremental tick after ``--new`` packages were archived in new scans of 10 groupings
   (creates one calibrate run per new scan);
3. an incremental tick after those runs completed (creates the combine runs downstream);
4. a full re-evaluation of every pipeline in one tick (the hourly safety net, run unbounded
   here; the manager itself stops starting full evaluations after half its interval);
5. with ``--drop-archived-index``: (1) and (2) again after dropping migration 0010's partial
   index on ``archived_at`` (``rdp_archived_at_idx``), to show what it saves.

reporting wall time, SQL time, statements (``connection.execute_wrapper``; savepoints apart),
statements per grouping, the slowest statement and the runs created.

    .venv/bin/python benchmarks/trigger_tick.py [--packages 100000] [--groupings 1000]

Uses its own PostgreSQL database ``bench_triggers`` (dropped at the end). Prints a table and
exits; not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from _django import django_environment, machine_line
from packaging_tick import SqlLog, maxrss_mb

DB_NAME = "bench_triggers"
COPY_CHUNK = 100_000
INTERVAL = 60.0


def copy_rows(table: str, columns: str, rows: Iterable[str]) -> int:
    """COPY tab-separated ``rows`` into ``table`` in chunks; returns the row count."""
    from django.db import connection

    loaded = 0
    chunk: list[str] = []
    with connection.cursor() as cursor:
        raw = cursor.cursor
        for line in rows:
            chunk.append(line)
            if len(chunk) == COPY_CHUNK:
                raw.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(chunk)))
                loaded += len(chunk)
                chunk = []
        if chunk:
            raw.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(chunk)))
            loaded += len(chunk)
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=100_000)
    parser.add_argument("--groupings", type=int, default=1_000)
    parser.add_argument("--per-scan", type=int, default=10, help="packages per scan")
    parser.add_argument("--new", type=int, default=100, help="packages archived for tick 2")
    parser.add_argument("--ticks", type=int, default=3, help="no-change ticks to measure")
    parser.add_argument("--drop-archived-index", action="store_true")
    args = parser.parse_args()
    header = machine_line()
    with django_environment("trigger-tick", postgres_db=DB_NAME):
        run(args, header)


def run(args: argparse.Namespace, header: str) -> None:
    from django.conf import settings
    from django.db import connection
    from django.utils import timezone

    from pipelines.demo.facility import demo_facility_load
    from pipelines.grouping import sub_group_key
    from pipelines.models import (
        DataGrouping,
        DataLocation,
        ExecutedObsUnit,
        ExecutedReductionStep,
        InstrumentModule,
        ObservingProgram,
        ObsUnit,
        Pipeline,
        RawDataPackage,
        ReductionSoftware,
        ReductionStep,
        Source,
    )
    from pipelines.services import triggers

    # The tick's own budget for full evaluations would stop (4) after 30 s; measure it whole.
    settings.WORKFLOW_MANAGER_INTERVAL = 10**6
    demo_facility_load()
    processing = DataLocation.objects.get(site__short_name="cologne", name="processing")
    settings.PROCESSING_LOCATION_ID = processing.pk
    modules = list(InstrumentModule.objects.filter(instrument__name="CHAI").order_by("name"))
    program = ObservingProgram.objects.order_by("pk").first()
    assert program is not None
    epoch = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    now = timezone.now()

    # --- load ---------------------------------------------------------------------------------
    started = time.perf_counter()
    g = args.groupings
    sources = Source.objects.bulk_create(
        Source(name=f"bench-src-{i:05d}", ra_deg=1.0, dec_deg=-1.0) for i in range(g)
    )
    obs_units = ObsUnit.objects.bulk_create(
        ObsUnit(name=f"bench-ou-{i:05d}", observing_program=program, source=sources[i])
        for i in range(g)
    )
    n_scans = args.packages // args.per_scan
    scans = ExecutedObsUnit.objects.bulk_create(
        (
            ExecutedObsUnit(
                id=uuid.uuid4(),
                obs_unit=obs_units[s % g],
                start_time=epoch + dt.timedelta(minutes=s),
                status=ExecutedObsUnit.ObsStatus.COMPLETED,
            )
            for s in range(n_scans)
        ),
        batch_size=5000,
    )
    software = ReductionSoftware.objects.create(name="bench-software")
    groupings = DataGrouping.objects.bulk_create(
        DataGrouping(
            name=f"bench-grouping-{i:05d}",
            filter_rules=[
                {"table": "Source", "column": "name", "operator": "eq", "value": sources[i].name},
                {
                    "table": "RawDataPackage",
                    "column": "state",
                    "operator": "eq",
                    "value": "archived",
                },
            ],
        )
        for i in range(g)
    )
    pipelines = Pipeline.objects.bulk_create(
        Pipeline(
            name=f"bench-pipeline-{i:05d}",
            data_grouping=groupings[i],
            processing_location=processing,
            priority=i % 7,
            trigger_watermark=now - triggers.WATERMARK_LAG,
            full_evaluation_at=now,
        )
        for i in range(g)
    )
    calibrates = ReductionStep.objects.bulk_create(
        ReductionStep(
            pipeline=p,
            name="calibrate",
            step_order=1,
            group_by=["executed_obs_unit"],
            cooldown_seconds=60,
            software=software,
        )
        for p in pipelines
    )
    combines = ReductionStep.objects.bulk_create(
        ReductionStep(
            pipeline=p, name="combine", step_order=2, group_by=[], cooldown_seconds=3600,
            software=software,
        )
        for p in pipelines[::2]
    )  # fmt: skip
    ReductionStep.depends_on.through.objects.bulk_create(
        ReductionStep.depends_on.through(
            from_reductionstep_id=c.pk, to_reductionstep_id=calibrates[2 * i].pk
        )
        for i, c in enumerate(combines)
    )
    package_columns = (
        "id, created_at, updated_at, retry_count, max_retries, lease_owner, claim_token, "
        "idempotency_key, status, failure_error_message, name, relative_path, "
        "executed_obs_unit_id, instrument_module_id, size, file_count, checksum, "
        "checksum_algorithm, state, metadata, archived_at"
    )

    def package_rows() -> Iterable[str]:
        for n in range(n_scans * args.per_scan):
            at = (epoch + dt.timedelta(seconds=n)).isoformat()
            yield (
                f"{n + 1}\t{at}\t{at}\t0\t3\t\t\t\tcompleted\t\tpkg-{n:07d}.tar\t"
                f"packages/pkg-{n:07d}.tar\t{scans[n // args.per_scan].pk}\t"
                f"{modules[n % len(modules)].pk}\t4096\t4\t{n:064x}\tsha256\tarchived\t{{}}\t{at}\n"
            )

    loaded = copy_rows("raw_data_package", package_columns, package_rows())
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('raw_data_package', 'id'), %s)", [loaded]
        )
    # Completed runs covering every sub-group: one per (calibrate, scan), one "all" per combine.
    run_columns = (
        "id, created_at, updated_at, retry_count, max_retries, lease_owner, claim_token, "
        "idempotency_key, reduction_step_id, sub_group_key, sub_group_values, status, "
        "triggered_by, config_snapshot, hpc_job_id, attempts, failure_reason, workspace_dir, "
        "log_path, run_dir, failed_for_good, excluded_inputs"
    )
    old = (epoch + dt.timedelta(days=1)).isoformat()
    run_lines: list[str] = []
    link_lines: list[str] = []
    run_id = 0
    for s, scan in enumerate(scans):
        run_id += 1
        values = {"executed_obs_unit": str(scan.pk)}
        key = sub_group_key(["executed_obs_unit"], values)
        run_lines.append(
            f"{run_id}\t{old}\t{old}\t0\t3\t\t\t\t{calibrates[s % g].pk}\t{key}\t"
            f"{json.dumps(values)}\tcompleted\tautomatic\t{{}}\t\t[]\t\t\t\t\tf\t[]\n"
        )
        for k in range(args.per_scan):
            link_lines.append(f"{run_id}\t{s * args.per_scan + k + 1}\n")
    for i, combine in enumerate(combines):
        run_id += 1
        run_lines.append(
            f"{run_id}\t{old}\t{old}\t0\t3\t\t\t\t{combine.pk}\tall\t{{}}\tcompleted\t"
            f"automatic\t{{}}\t\t[]\t\t\t\t\tf\t[]\n"
        )
        source_index = 2 * i
        for s in range(source_index, n_scans, g):
            for k in range(args.per_scan):
                link_lines.append(f"{run_id}\t{s * args.per_scan + k + 1}\n")
    runs_loaded = copy_rows("executed_reduction_step", run_columns, run_lines)
    links_loaded = copy_rows(
        "executed_reduction_step_input_package",
        "executedreductionstep_id, rawdatapackage_id",
        link_lines,
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('executed_reduction_step', 'id'), %s)", [run_id]
        )
        for table in (
            "raw_data_package",
            "executed_reduction_step",
            "executed_reduction_step_input_package",
            "executed_obs_unit",
            "obs_unit",
            "source",
        ):
            cursor.execute(f"VACUUM ANALYZE {table}")
    print(
        f"# loaded {loaded} archived packages in {n_scans} scans over {g} groupings/pipelines "
        f"({len(calibrates) + len(combines)} steps), {runs_loaded} completed runs and "
        f"{links_loaded} run inputs in {time.perf_counter() - started:.1f} s"
    )

    # --- measure ------------------------------------------------------------------------------
    results: list[tuple[str, dict[str, Any]]] = []
    clock = {"now": now}

    def measure(label: str, fn: Callable[[], Any]) -> Any:
        log = SqlLog()
        start = time.perf_counter()
        with connection.execute_wrapper(log):
            outcome = fn()
        seconds = time.perf_counter() - start
        slow_t, slow_sql = log.slowest()
        results.append(
            (
                label,
                {
                    "seconds": seconds,
                    "sql_seconds": log.sql_seconds(),
                    "statements": log.statements,
                    "savepoints": log.savepoints,
                    "slowest": (slow_t, " ".join(slow_sql.split())[:100]),
                    "outcome": outcome,
                    "rss": maxrss_mb(),
                },
            )
        )
        return outcome

    def tick() -> dict[str, int]:
        clock["now"] += dt.timedelta(seconds=INTERVAL)
        return triggers.trigger_manager_tick(owner="bench", now=clock["now"])

    def archive_new(count: int) -> None:
        """``count`` packages archived now, in new scans of the first 10 sources."""
        per = max(1, count // 10)
        start_id = RawDataPackage.objects.order_by("-pk").values_list("pk", flat=True)[0]
        new_scans = ExecutedObsUnit.objects.bulk_create(
            ExecutedObsUnit(
                id=uuid.uuid4(), obs_unit=obs_units[i], start_time=clock["now"],
                status=ExecutedObsUnit.ObsStatus.COMPLETED,
            )
            for i in range(10)
        )  # fmt: skip
        RawDataPackage.objects.bulk_create(
            RawDataPackage(
                name=f"new-{start_id + j}.tar",
                relative_path=f"packages/new-{start_id + j}.tar",
                executed_obs_unit=new_scans[j // per % 10],
                instrument_module=modules[0],
                checksum=f"{start_id + j:064x}",
                state="archived",
                archived_at=clock["now"] + dt.timedelta(seconds=30),
            )
            for j in range(per * 10)
        )

    for i in range(args.ticks):
        measure(f"incremental, no change #{i + 1}", tick)
    archive_new(args.new)
    measure(f"incremental, {args.new} packages archived in 10 new scans", tick)
    new_runs = ExecutedReductionStep.objects.filter(status="pending")
    ExecutedReductionStep.objects.filter(pk__in=list(new_runs.values_list("pk", flat=True))).update(
        status="completed", updated_at=clock["now"] + dt.timedelta(seconds=30)
    )
    measure("incremental, those 10 runs completed", tick)
    measure("incremental, no change after", tick)
    Pipeline.objects.update(full_evaluation_at=None)
    measure(f"full re-evaluation of all {g} pipelines", tick)
    if args.drop_archived_index:
        with connection.cursor() as cursor:
            cursor.execute("DROP INDEX rdp_archived_at_idx")
            cursor.execute("ANALYZE raw_data_package")
        for i in range(args.ticks):
            measure(f"without the archived_at index: incremental, no change #{i + 1}", tick)
        archive_new(args.new)
        measure(f"without the archived_at index: {args.new} packages archived", tick)

    # --- report -------------------------------------------------------------------------------
    print(f"\n{header}; PostgreSQL {connection.pg_version // 10000}")
    print(
        f"{loaded} packages, {g} groupings/pipelines, {len(calibrates) + len(combines)} steps, "
        f"{runs_loaded} runs; interval {INTERVAL:.0f} s\n"
    )
    print("| tick | wall s | SQL s | statements | per grouping | created | % of 60 s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results:
        print(
            f"| {label} | {r['seconds']:.2f} | {r['sql_seconds']:.2f} | {r['statements']}"
            f" (+{r['savepoints']} savepoints) | {r['statements'] / g:.2f} | "
            f"{r['outcome']['created']} | {100 * r['seconds'] / INTERVAL:.1f}% |"
        )
    print("\nslowest statement per tick:")
    for label, r in results:
        t, sql = r["slowest"]
        print(f"- {label}: {t * 1000:.0f} ms `{sql}`")
    print(f"\nmax RSS {results[-1][1]['rss']:.0f} MB")


if __name__ == "__main__":
    main()
