"""A deletion manager tick and ``deletion_plan`` over 10^6 physical copies in PostgreSQL.

Issue 10 asks for the time, the SQL statements and the peak memory of both at 10^6 copies;
SPEC §9 wants a manager tick well under its interval with bounded memory. This script loads the
demo facility, then ``--packages`` ARCHIVED-or-not raw data packages (default 50,000) with
``--files`` raw files each (default 17) into its own database ``bench_deletion``, with COPY:

- one SOURCE copy per file at the observatory (``ccat:chai_raw_data``),
- one package copy in the observatory's buffer, one in Cologne's buffer, one in Cologne's
  long-term archive (verified now),
- one transfer bundle per 10 packages with its tar in the observatory buffer and a completed,
  unpacked primary transfer,

which is 50,000 x (17 + 3) + 5,000 = 1,005,000 copies. 90% of the packages are ARCHIVED 30 days
ago (so their observatory copies may go), 10% are still TRANSFERRING. It then measures:

- ``deletion_plan()`` streamed to the end (every copy judged), untraced; then the first 20,000
  and the first 200,000 entries under tracemalloc (the same peak for both: bounded memory);
- ``deletion_manager_tick()`` (schedules up to 500 copies, claims them and enqueues their
  deletions on Redis DB 9), the usual case;
- the worst tick: every archive copy's verification made stale first, so nothing may go and
  the tick judges every candidate the SQL pre-filter lets through before it finds none.

Each line: wall time, SQL statements, peak traced memory (where traced) and max RSS.

    .venv/bin/python benchmarks/deletion.py [--packages 50000] [--files 17]

Prints a table and exits; not a test. The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import itertools
import resource
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from _django import django_environment, machine_line

DB_NAME = "bench_deletion"
COPY_CHUNK = 100_000
INTERVAL = 60.0


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Statements:
    """Counts the statements a block sends (savepoints apart)."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        self.kinds[sql.lstrip().split(None, 1)[0].upper()] += 1
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            # Statements grouped by their first 80 characters after FROM (the table read).
            shape = " ".join(sql.split())
            self.seconds[shape[shape.find(" FROM ") : shape.find(" FROM ") + 80]] += (
                time.perf_counter() - start
            )

    def slowest(self, n: int = 3) -> str:
        return "; ".join(f"{t:.2f} s{shape}" for shape, t in self.seconds.most_common(n))

    @property
    def total(self) -> int:
        return sum(n for kind, n in self.kinds.items() if kind not in ("SAVEPOINT", "RELEASE"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=50_000)
    parser.add_argument("--files", type=int, default=17, help="raw files per package")
    parser.add_argument("--profile", action="store_true", help="cProfile one more plan")
    args = parser.parse_args()
    if args.packages < 10 or args.files < 1:
        parser.error("--packages must be at least 10 and --files at least 1")
    header = machine_line()
    with django_environment("deletion", postgres_db=DB_NAME):
        run(args, header)


def _copy(cursor: Any, table: str, columns: str, rows: Iterator[str]) -> int:
    """COPY ``rows`` (tab-separated lines) into ``table`` in chunks; returns the count."""
    loaded = 0
    chunk: list[str] = []
    for line in rows:
        chunk.append(line)
        if len(chunk) == COPY_CHUNK:
            cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(chunk)))
            loaded += len(chunk)
            chunk = []
    if chunk:
        cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", io.StringIO("".join(chunk)))
        loaded += len(chunk)
    return loaded


def run(args: argparse.Namespace, header: str) -> None:
    from django.db import connection
    from django.utils import timezone

    from pipelines.demo.facility import demo_facility_load
    from pipelines.models import (
        DataLocation,
        DataTransfer,
        DataTransferPackage,
        DeletionTask,
        ExecutedObsUnit,
        InstrumentModule,
        ObsUnit,
        PhysicalCopy,
        RawDataPackage,
        Status,
    )
    from pipelines.services.deletion import deletion_manager_tick, deletion_plan

    demo_facility_load()
    loc = {
        (site, name): DataLocation.objects.get(site__short_name=site, name=name)
        for site, name in (
            ("ccat", "chai_raw_data"),
            ("ccat", "buffer"),
            ("cologne", "buffer"),
            ("cologne", "lta"),
        )
    }
    source, obs_buffer = loc["ccat", "chai_raw_data"], loc["ccat", "buffer"]
    arc_buffer, lta = loc["cologne", "buffer"], loc["cologne", "lta"]
    module = InstrumentModule.objects.filter(instrument__name="CHAI").order_by("name").first()
    assert module is not None
    obs_unit = ObsUnit.objects.order_by("pk").first()
    now = timezone.now()
    archived_at = now - dt.timedelta(days=30)
    n_bundles = args.packages // 10

    started = time.perf_counter()
    scans = ExecutedObsUnit.objects.bulk_create(
        (
            ExecutedObsUnit(
                id=uuid.uuid4(),
                obs_unit=obs_unit,
                start_time=archived_at,
                end_time=archived_at,
                status=ExecutedObsUnit.ObsStatus.COMPLETED,
            )
            for _ in range(n_bundles)
        ),
        batch_size=2000,
    )
    bundles = DataTransferPackage.objects.bulk_create(
        (
            DataTransferPackage(
                name=f"bundle_{b:06d}.tar",
                relative_path=f"bundles/bundle_{b:06d}.tar",
                origin_location=obs_buffer,
                status=Status.COMPLETED,
                size=1,
                checksum=f"{b:064x}",
            )
            for b in range(n_bundles)
        ),
        batch_size=2000,
    )
    DataTransfer.objects.bulk_create(
        (
            DataTransfer(
                data_transfer_package=bundle,
                origin_location=obs_buffer,
                destination_location=arc_buffer,
                is_primary=True,
                status=Status.COMPLETED,
                unpack_status=Status.COMPLETED,
            )
            for bundle in bundles
        ),
        batch_size=2000,
    )
    packages = RawDataPackage.objects.bulk_create(
        (
            RawDataPackage(
                name=f"package_{p:07d}.tar",
                relative_path=f"packages/package_{p:07d}.tar",
                executed_obs_unit=scans[p // 10],
                instrument_module=module,
                origin_location=obs_buffer,
                status=Status.COMPLETED,
                size=1,
                file_count=args.files,
                checksum=f"{p:064x}",
                state="archived" if p % 10 else "transferring",
                archived_at=archived_at if p % 10 else None,
                data_transfer_package=bundles[p // 10],
            )
            for p in range(args.packages)
        ),
        batch_size=5000,
    )
    stamp = now.isoformat()

    def files() -> Iterator[str]:
        for p, package in enumerate(packages):
            for k in range(args.files):
                name = f"f_{p:07d}_{k:03d}.fits"
                yield (
                    f"{uuid.uuid5(uuid.NAMESPACE_OID, name)}\t{name}\traw/{name}\t1\t"
                    f"{p * 100 + k:064x}\tsha256\tfits\t{package.executed_obs_unit_id}\t"
                    f"{module.pk}\t{source.pk}\t{package.pk}\t{{}}\t{stamp}\t{stamp}\n"
                )

    copy_columns = (
        "kind, raw_data_file_id, raw_data_package_id, data_transfer_package_id, location_id, "
        "relative_path, status, integrity, verified_checksum, checksum_verified_at, "
        "deletion_reason, retry_count, last_error, created_at, updated_at"
    )

    def copies() -> Iterator[str]:
        def line(kind: str, file: str, package: str, bundle: str, where: int, path: str) -> str:
            return (
                f"{kind}\t{file}\t{package}\t{bundle}\t{where}\t{path}\tpresent\tverified\t"
                f"x\t{stamp}\t\t0\t\t{stamp}\t{stamp}\n"
            )

        for p, package in enumerate(packages):
            for k in range(args.files):
                name = f"f_{p:07d}_{k:03d}.fits"
                file_id = uuid.uuid5(uuid.NAMESPACE_OID, name)
                yield line("raw_data_file", str(file_id), r"\N", r"\N", source.pk, f"raw/{name}")
            for where in (obs_buffer, arc_buffer, lta):
                yield line(
                    "raw_data_package", r"\N", str(package.pk), r"\N", where.pk,
                    package.relative_path,
                )  # fmt: skip
        for bundle in bundles:
            yield line(
                "data_transfer_package", r"\N", r"\N", str(bundle.pk), obs_buffer.pk,
                bundle.relative_path,
            )  # fmt: skip

    with connection.cursor() as cursor:
        raw = cursor.cursor
        n_files = _copy(
            raw,
            "raw_data_file",
            "id, name, relative_path, size, checksum, checksum_algorithm, file_type, "
            "executed_obs_unit_id, instrument_module_id, source_location_id, "
            "raw_data_package_id, metadata, created_at, updated_at",
            files(),
        )
        n_copies = _copy(raw, "physical_copy", copy_columns, copies())
    load_seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        for table in ("raw_data_file", "raw_data_package", "physical_copy", "data_transfer"):
            cursor.execute(f"VACUUM ANALYZE {table}")
    print(
        f"# loaded {args.packages} packages ({n_bundles} bundles), {n_files} raw files and "
        f"{n_copies} physical copies in {time.perf_counter() - started:.0f} s "
        f"(COPY + bulk_create {load_seconds:.0f} s)"
    )

    results: list[tuple[str, float, int, float | None, float, Any]] = []

    def measure(label: str, fn: Callable[[], Any], *, trace: bool) -> Any:
        log = Statements()
        if trace:
            tracemalloc.start()
        start = time.perf_counter()
        with connection.execute_wrapper(log):
            outcome = fn()
        seconds = time.perf_counter() - start
        peak = None
        if trace:
            peak = tracemalloc.get_traced_memory()[1] / 1e6
            tracemalloc.stop()
        results.append((label, seconds, log.total, peak, maxrss_mb(), outcome))
        print(f"# {label}: {seconds:.1f} s, {log.total} statements, {outcome}", flush=True)
        print(f"#   slowest statement shapes: {log.slowest()}", flush=True)
        return outcome

    def plan() -> dict[str, int]:
        return dict(Counter(entry.verdict.rule for entry in deletion_plan()))

    measure("deletion_plan (every copy)", plan, trace=False)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        plan()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
    # The traced peak of the first 20,000 and the first 200,000 entries: equal peaks show the
    # plan's memory does not grow with the number of copies (tracing the whole 10^6 would
    # take several times as long as the untraced run).
    for first in (20_000, 200_000):
        if first <= n_copies:
            measure(
                f"deletion_plan, first {first:,} (tracemalloc)",
                lambda first=first: dict(  # type: ignore[misc]
                    Counter(e.verdict.rule for e in itertools.islice(deletion_plan(), first))
                ),
                trace=True,
            )
    measure("deletion_manager_tick", lambda: deletion_manager_tick(owner="bench"), trace=False)
    measure(
        "deletion_manager_tick (tracemalloc)",
        lambda: deletion_manager_tick(owner="bench"),
        trace=True,
    )
    # Worst case: nothing may go, so the tick judges every pre-filtered candidate.
    PhysicalCopy.objects.filter(location=lta).update(
        checksum_verified_at=now - dt.timedelta(days=90)
    )
    measure(
        "worst tick: nothing may go",
        lambda: deletion_manager_tick(owner="bench"),
        trace=True,
    )
    scheduled = DeletionTask.objects.count()

    print(
        f"\n{n_copies} physical copies ({args.packages} packages x ({args.files} files + 3 "
        f"package copies) + {n_bundles} bundle tars), PostgreSQL on localhost; {header}"
    )
    print(f"{'what':38} {'wall s':>7} {'stmts':>7} {'peak MB':>8} {'maxrss MB':>9}  result")
    for label, seconds, statements, peak, rss, outcome in results:
        peak_text = f"{peak:8.1f}" if peak is not None else f"{'-':>8}"
        print(f"{label:38} {seconds:7.1f} {statements:7d} {peak_text} {rss:9.0f}  {outcome}")
    print(f"deletion tasks created by the measured ticks: {scheduled}")


if __name__ == "__main__":
    main()
