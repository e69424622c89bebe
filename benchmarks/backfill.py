"""Backfill planning over many packages in PostgreSQL (issue 12).

Loads ``--packages`` ARCHIVED RawDataPackage rows (COPY) in scans of ``--per-scan`` packages,
one scan a minute from 2026-01-01, for one pipeline with a per-scan step ("calibrate",
group_by executed_obs_unit) and a combined step ("combine", group_by [], depends on
calibrate). Every second scan already has a COMPLETED calibrate run covering it, every tenth of
those a FAILED-for-good one instead. Then it measures ``campaign_plan`` (what ``manage.py
backfill --dry-run`` does: reads only) for:

1. ``--missing-only`` over the whole range (plans the uncovered half of the scans);
2. ``--failed`` over the whole range;
3. ``--all`` over the whole range;
4. ``--all`` over a tenth of the range;
5. creating the runs of (4) (``campaign_advance``: one savepoint per run);

reporting wall time, SQL time, statements (``connection.execute_wrapper``; savepoints apart),
the slowest statement and the runs planned.

    .venv/bin/python benchmarks/backfill.py [--packages 100000] [--per-scan 10]

Uses its own PostgreSQL database ``bench_backfill`` (dropped at the end). Prints a table and
exits; not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from _django import django_environment, machine_line
from packaging_tick import SqlLog, maxrss_mb
from trigger_tick import copy_rows

DB_NAME = "bench_backfill"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=100_000)
    parser.add_argument("--per-scan", type=int, default=10, help="packages per scan")
    args = parser.parse_args()
    header = machine_line()
    with django_environment("backfill", postgres_db=DB_NAME):
        run(args, header)


def run(args: argparse.Namespace, header: str) -> None:
    from django.db import connection

    from pipelines.demo.facility import demo_facility_load
    from pipelines.grouping import sub_group_key
    from pipelines.models import (
        DataGrouping,
        DataLocation,
        ExecutedObsUnit,
        InstrumentModule,
        ObservingProgram,
        ObsUnit,
        Pipeline,
        ReductionSoftware,
        ReductionStep,
        Source,
    )
    from pipelines.services import campaigns

    demo_facility_load()
    processing = DataLocation.objects.get(site__short_name="cologne", name="processing")
    module = InstrumentModule.objects.filter(instrument__name="CHAI").order_by("name").first()
    program = ObservingProgram.objects.order_by("pk").first()
    assert module is not None and program is not None
    epoch = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    started = time.perf_counter()
    source = Source.objects.create(name="bench-backfill-src", ra_deg=1.0, dec_deg=-1.0)
    obs_unit = ObsUnit.objects.create(
        name="bench-backfill-ou", observing_program=program, source=source
    )
    n_scans = args.packages // args.per_scan
    scans = ExecutedObsUnit.objects.bulk_create(
        (
            ExecutedObsUnit(
                id=uuid.uuid4(),
                obs_unit=obs_unit,
                start_time=epoch + dt.timedelta(minutes=s),
                status=ExecutedObsUnit.ObsStatus.COMPLETED,
            )
            for s in range(n_scans)
        ),
        batch_size=5000,
    )
    software = ReductionSoftware.objects.create(name="bench-backfill-software")
    grouping = DataGrouping.objects.create(
        name="bench-backfill",
        filter_rules=[
            {"table": "Source", "column": "name", "operator": "eq", "value": source.name},
            {"table": "RawDataPackage", "column": "state", "operator": "eq", "value": "archived"},
        ],
    )
    pipeline = Pipeline.objects.create(
        name="bench-backfill", data_grouping=grouping, processing_location=processing
    )
    calibrate = ReductionStep.objects.create(
        pipeline=pipeline, name="calibrate", step_order=1, group_by=["executed_obs_unit"],
        software=software,
    )  # fmt: skip
    combine = ReductionStep.objects.create(
        pipeline=pipeline, name="combine", step_order=2, group_by=[], software=software
    )
    combine.depends_on.add(calibrate)
    package_columns = (
        "id, created_at, updated_at, retry_count, max_retries, lease_owner, claim_token, "
        "idempotency_key, status, failure_error_message, name, relative_path, "
        "executed_obs_unit_id, instrument_module_id, size, file_count, checksum, "
        "checksum_algorithm, state, metadata, archived_at"
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT COALESCE(MAX(id), 0) FROM raw_data_package")
        first_id = cursor.fetchone()[0] + 1

    def package_rows() -> Iterable[str]:
        for n in range(n_scans * args.per_scan):
            at = (epoch + dt.timedelta(seconds=n)).isoformat()
            yield (
                f"{first_id + n}\t{at}\t{at}\t0\t3\t\t\t\tcompleted\t\tbf-{n:07d}.tar\t"
                f"packages/bf-{n:07d}.tar\t{scans[n // args.per_scan].pk}\t"
                f"{module.pk}\t4096\t4\t{n:064x}\tsha256\tarchived\t{{}}\t{at}\n"
            )

    loaded = copy_rows("raw_data_package", package_columns, package_rows())
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
        if s % 2:
            continue  # odd scans were never processed: the gap a backfill fills
        run_id += 1
        values: dict[str, object] = {"executed_obs_unit": str(scan.pk)}
        key = sub_group_key(["executed_obs_unit"], values)
        status, for_good = ("failed", "t") if s % 20 == 0 else ("completed", "f")
        run_lines.append(
            f"{run_id}\t{old}\t{old}\t0\t3\t\t\t\t{calibrate.pk}\t{key}\t"
            f"{json.dumps(values)}\t{status}\tautomatic\t{{}}\t\t[]\t\t\t\t\t{for_good}\t[]\n"
        )
        for k in range(args.per_scan):
            link_lines.append(f"{run_id}\t{first_id + s * args.per_scan + k}\n")
    runs_loaded = copy_rows("executed_reduction_step", run_columns, run_lines)
    copy_rows(
        "executed_reduction_step_input_package",
        "executedreductionstep_id, rawdatapackage_id",
        link_lines,
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('raw_data_package', 'id'), %s)",
            [first_id + loaded],
        )
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('executed_reduction_step', 'id'), %s)", [run_id]
        )
        for table in (
            "raw_data_package",
            "executed_reduction_step",
            "executed_reduction_step_input_package",
            "executed_obs_unit",
        ):
            cursor.execute(f"VACUUM ANALYZE {table}")
    load_seconds = time.perf_counter() - started
    end = epoch + dt.timedelta(minutes=n_scans)
    tenth = epoch + dt.timedelta(minutes=n_scans // 10)

    print(
        f"# backfill planning: {loaded:,} packages in {n_scans:,} scans, {runs_loaded:,} "
        f"calibrate runs loaded in {load_seconds:.1f} s; {header}; max RSS {maxrss_mb():.0f} MB"
    )
    print("| case | wall s | SQL s | statements | slowest statement s | runs planned |")
    print("|---|---:|---:|---:|---:|---:|")

    def measure(label: str, fn: Callable[[], Any], count: Callable[[Any], int]) -> Any:
        log = SqlLog()
        with connection.execute_wrapper(log):
            t0 = time.perf_counter()
            result = fn()
            wall = time.perf_counter() - t0
        slowest, _sql = log.slowest()
        print(
            f"| {label} | {wall:.2f} | {log.sql_seconds():.2f} | {log.statements} | "
            f"{slowest:.3f} | {count(result):,} |"
        )
        return result

    def params(mode: str, until: dt.datetime) -> dict[str, Any]:
        return campaigns.backfill_parameters(
            pipeline=pipeline.name, since=epoch.isoformat(), until=until.isoformat(), mode=mode
        )

    for mode, until, label in (
        ("missing", end, "plan --missing-only, whole range"),
        ("failed", end, "plan --failed, whole range"),
        ("all", end, "plan --all, whole range"),
        ("all", tenth, "plan --all, a tenth of the range"),
    ):

        def plan(m: str = mode, u: dt.datetime = until) -> Any:
            return campaigns.campaign_plan("backfill", params(m, u))

        measure(label, plan, lambda result: len(result.runs))
    campaign, _ = campaigns.campaign_find_or_create(
        "backfill", params("all", tenth), max_active=10, requested_by="benchmark"
    )
    measure(
        "create the runs of --all, a tenth (campaign_advance)",
        lambda: campaigns.campaign_advance(campaign, actor="benchmark"),
        lambda result: result.created,
    )


if __name__ == "__main__":
    main()
