"""The storage audit of one disk location with 10^5 files against PostgreSQL (issue 10: "an
audit of 10^5 files (time, memory)"; SPEC §9: memory of a manager tick bounded).

Creates ``--files`` files (default 10^5, one byte each, in directories of 1,000) under a
temporary disk location, registers a package copy for ``--known`` percent of them (default 90,
loaded with ``bulk_create``), plus ``--lost`` copies whose files do not exist, then measures:

- the bare listing (``Storage.list_entries``: walk + lstat, no database), as the floor;
- audit #1: the first audit (every dark file is new and inserted, the lost copies are marked
  MISSING through ``copy_mark_damaged``);
- audit #2 and #3: steady state (dark files already recorded, lost copies already MISSING);
- one more steady-state audit under tracemalloc (tracing slows Python down), for the peak of
  Python allocations, next to the tracemalloc peak of merely holding every listed path in a
  set, the design the audit avoids.

For each: wall time, SQL statements (``connection.execute_wrapper``; savepoints apart), SQL
time, max RSS before and after. Uses its own PostgreSQL database ``bench_audit`` (dropped at the
end). Prints a table and exits; not a test.

    .venv/bin/python benchmarks/audit.py [--files 100000] [--known 90] [--lost 100] [--profile]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _django import django_environment, machine_line

DB_NAME = "bench_audit"
PER_DIRECTORY = 1000
BATCH = 10_000


@dataclass
class SqlLog:
    kinds: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.seconds += time.perf_counter() - start
            self.kinds[sql.lstrip().split(None, 1)[0].upper()] += 1

    @property
    def statements(self) -> int:
        return sum(n for kind, n in self.kinds.items() if kind not in ("SAVEPOINT", "RELEASE"))


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--known", type=int, default=90, help="percent of files with a copy")
    parser.add_argument("--lost", type=int, default=100, help="copies whose file is absent")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile one more audit")
    args = parser.parse_args()
    header = f"# {machine_line()}"
    with django_environment("audit", postgres_db=DB_NAME) as tmp:
        run(args, tmp, header)


def populate(root: Path, location: Any, files: int, known_percent: int, lost: int) -> None:
    from pipelines.models import PhysicalCopy, RawDataPackage
    from tests import factories as f

    started = time.perf_counter()
    stamp = time.time() - 3600
    paths = [f"d{n // PER_DIRECTORY:04d}/f{n:07d}.dat" for n in range(files)]
    for n, path in enumerate(paths):
        if n % PER_DIRECTORY == 0:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
        target = root / path
        target.write_bytes(b"x")
        os.utime(target, (stamp, stamp))
    print(f"# {files} files written in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    scan = f.ExecutedObsUnitFactory()
    module = f.InstrumentModuleFactory()
    known = [p for n, p in enumerate(paths) if n % 100 < known_percent]
    registered = known + [f"lost/l{n:05d}.tar" for n in range(lost)]
    for start in range(0, len(registered), BATCH):
        batch = registered[start : start + BATCH]
        packages = RawDataPackage.objects.bulk_create(
            RawDataPackage(
                name=f"p{start + n:07d}.tar",
                relative_path=path,
                executed_obs_unit=scan,
                instrument_module=module,
                size=1,
                file_count=1,
                checksum=f"{start + n:064x}",
            )
            for n, path in enumerate(batch)
        )
        PhysicalCopy.objects.bulk_create(
            PhysicalCopy(
                kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
                raw_data_package=package,
                location=location,
                relative_path=package.relative_path,
                integrity=PhysicalCopy.Integrity.VERIFIED,
            )
            for package in packages
        )
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE physical_copy")
        cursor.execute("VACUUM ANALYZE dark_file")
    print(
        f"# {len(known)} known copies and {lost} lost ones registered in "
        f"{time.perf_counter() - started:.1f} s"
    )


def run(args: argparse.Namespace, tmp: Path, header: str) -> None:
    from django.db import connection

    from pipelines.models import DataLocation
    from pipelines.services import audit as audit_service
    from pipelines.storage.base import storage_for
    from tests import factories as f

    root = tmp / "buffer"
    root.mkdir()
    location = f.DataLocationFactory(
        site=f.SiteFactory(short_name="bench"),
        name="buffer",
        location_type=DataLocation.LocationType.BUFFER,
        root_path=str(root),
    )
    populate(root, location, args.files, args.known, args.lost)
    chunk = args.chunk_size or audit_service.AUDIT_CHUNK_SIZE
    rows: list[str] = []

    def listing() -> str:
        count = sum(1 for _ in storage_for(location).list_entries())
        return f"{count} entries"

    def audit() -> str:
        report = audit_service.audit_storage(location, chunk_size=chunk)
        return (
            f"known {report.known}, dark new {report.dark_new}, dark still "
            f"{report.dark_still_present}, lost marked {report.lost_marked}"
        )

    for name, work in (
        ("bare listing (`list_entries`)", listing),
        ("audit #1 (first: dark inserted, lost marked)", audit),
        ("audit #2 (steady state)", audit),
        ("audit #3 (steady state)", audit),
    ):
        log = SqlLog()
        before = maxrss_mb()
        started = time.perf_counter()
        with connection.execute_wrapper(log):
            found = work()
        wall = time.perf_counter() - started
        rows.append(
            f"| {name} | {wall:.2f} | {log.seconds:.2f} | {log.statements} | — | "
            f"{before:.0f} → {maxrss_mb():.0f} MB | {found} |"
        )

    tracemalloc.start()
    log = SqlLog()
    started = time.perf_counter()
    with connection.execute_wrapper(log):
        found = audit()
    wall = time.perf_counter() - started
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rows.append(
        f"| audit #4 (steady state, tracemalloc) | {wall:.2f} | {log.seconds:.2f} | "
        f"{log.statements} | {peak / 1e6:.1f} MB | {maxrss_mb():.0f} MB | {found} |"
    )

    tracemalloc.start()
    everything = {entry.relative_path for entry in storage_for(location).list_entries()}
    _current, set_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rows.append(
        f"| for comparison: a set of every listed path | — | — | — | {set_peak / 1e6:.1f} MB | "
        f"— | {len(everything)} paths |"
    )
    del everything

    if args.profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(audit)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())

    print(header)
    print(
        f"# {args.files} files, {args.known}% known, {args.lost} lost copies, chunk size "
        f"{chunk}, {connection.vendor}"
    )
    print("| what | wall s | SQL s | statements | tracemalloc peak | max RSS | found |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
