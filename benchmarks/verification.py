"""Verification throughput: ``copy_verify`` (what the integrity manager's workers and
``manage.py verify_copies`` run per copy: one query for the row, the full read-back, the
recorded result) against hashing the same files with no database at all.

Issue 10: >= 0.9 x ``openssl dgst -sha256`` for copies whose object uses sha256, and >= 0.9 x raw
xxh3_128 (the xxhash module over the same 4 MiB reads) for copies that use xxh3_128. Both sets
of copies point at the same files (two locations with one root), already in the page cache
(one warm-up pass first); each figure is the median of several passes.

    .venv/bin/python benchmarks/verification.py [--files 20] [--size-mb 50] [--runs 5] [--postgres]

Prints a table and exits; not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from _django import ROOT, django_environment, machine_line  # noqa: F401 - sets sys.path


def _make_files(directory: Path, count: int, size: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1024 * 1024)
    paths = []
    for i in range(count):
        path = directory / f"package_{i:03d}.tar"
        with open(path, "wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
        paths.append(path)
    return paths


def _interleaved_medians(sides: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds of each side over ``runs`` passes. Every pass runs every side, in an order
    rotated from pass to pass, so a burst of load from other processes (two shared cores) hits
    all sides alike instead of whichever happened to run then."""
    for fn in sides.values():
        fn()  # warm-up: page cache, imports, the first verification's state move
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for run in range(runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for name in order:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _raw_xxh3(paths: list[Path]) -> None:
    import xxhash

    from pipelines.storage.checksums import CHUNK_SIZE

    view = memoryview(bytearray(CHUNK_SIZE))
    for path in paths:
        hasher = xxhash.xxh3_128()
        with open(path, "rb", buffering=0) as handle:
            while read := handle.readinto(view):
                hasher.update(view[:read])
        hasher.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=50, help="size of each file (MiB)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    args = parser.parse_args()
    if not shutil.which("openssl"):
        raise SystemExit("openssl is not installed: nothing to compare sha256 with")

    database = "bench_verification" if args.postgres else None
    with django_environment("verification", postgres_db=database) as tmp:
        import datetime as dt
        import uuid

        from pipelines.demo.facility import demo_facility_load
        from pipelines.models import (
            DataLocation,
            ExecutedObsUnit,
            InstrumentModule,
            ObsUnit,
            PhysicalCopy,
            RawDataPackage,
            Site,
        )
        from pipelines.services.integrity import VERIFY_RELATED, copy_verify
        from pipelines.storage.checksums import checksum_file

        root = tmp / "archive"
        paths = _make_files(root, args.files, args.size_mb * 1024 * 1024)
        total = sum(p.stat().st_size for p in paths)
        # Packages need a scan and an instrument module: the demo facility's.
        demo_facility_load()
        site = Site.objects.get(short_name="cologne")
        module = InstrumentModule.objects.order_by("pk").first()
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        scan = ExecutedObsUnit.objects.create(
            id=uuid.uuid4(),
            obs_unit=ObsUnit.objects.order_by("pk").first(),
            start_time=start,
            end_time=start + dt.timedelta(minutes=5),
            status=ExecutedObsUnit.ObsStatus.COMPLETED,
        )
        # The per-copy cost beside the hashing: the same number of one-byte files.
        tiny = [root / "tiny" / f"t_{i:03d}" for i in range(args.files)]
        tiny[0].parent.mkdir()
        for path in tiny:
            path.write_bytes(b"x")
        copies: dict[str, list[PhysicalCopy]] = {}
        for algorithm, files in (("sha256", paths), ("xxh3_128", paths), ("tiny", tiny)):
            checksum_algorithm = "xxh3_128" if algorithm == "tiny" else algorithm
            location = DataLocation.objects.create(
                site=site,
                name=f"lta_{algorithm}",
                location_type=DataLocation.LocationType.LONG_TERM_ARCHIVE,
                root_path=str(root),
                checksum_algorithm=checksum_algorithm,
            )
            for path in files:
                package = RawDataPackage.objects.create(
                    name=f"{algorithm}_{path.name}",
                    executed_obs_unit=scan,
                    instrument_module=module,
                    relative_path=str(path.relative_to(root)),
                    checksum=checksum_file(path, checksum_algorithm),
                    checksum_algorithm=checksum_algorithm,
                    size=path.stat().st_size,
                )
                PhysicalCopy.objects.create(
                    kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
                    raw_data_package=package,
                    location=location,
                    relative_path=str(path.relative_to(root)),
                )
            # Loaded the way verify_copies and the verification worker load them.
            copies[algorithm] = list(
                PhysicalCopy.objects.filter(location=location)
                .select_related(*VERIFY_RELATED)
                .order_by("pk")
            )

        def verify(algorithm: str) -> Callable[[], object]:
            def run() -> None:
                outcomes = {copy_verify(c, actor="benchmark") for c in copies[algorithm]}
                assert outcomes == {"verified"}, outcomes

            return run

        sides: dict[str, Callable[[], object]] = {
            "openssl": lambda: subprocess.run(
                ["openssl", "dgst", "-sha256", *map(str, paths)], check=True, capture_output=True
            ),
            "sha256": verify("sha256"),
            "raw_xxh3": lambda: _raw_xxh3(paths),
            "xxh3_128": verify("xxh3_128"),
            "tiny": verify("tiny"),
        }
        seconds = _interleaved_medians(sides, args.runs)
        openssl, ours_sha = seconds["openssl"], seconds["sha256"]
        raw_xxh3, ours_xxh3 = seconds["raw_xxh3"], seconds["xxh3_128"]
        fixed = seconds["tiny"]
        vendor = "PostgreSQL" if args.postgres else "SQLite"

    rows = [
        ("openssl dgst -sha256", openssl, "baseline"),
        ("copy_verify, sha256 copies", ours_sha, f"{openssl / ours_sha:.2f} x openssl"),
        ("raw xxh3_128 (xxhash module)", raw_xxh3, "baseline"),
        ("copy_verify, xxh3_128 copies", ours_xxh3, f"{raw_xxh3 / ours_xxh3:.2f} x raw xxh3"),
    ]
    print(
        f"{args.files} files x {args.size_mb} MiB = {total / 1e9:.2f} GB, page cache, "
        f"median of {args.runs} passes, {vendor}, {machine_line()}"
    )
    print(f"{'what':30} {'seconds':>9} {'GB/s':>7} {'ms/copy':>8}  ratio (target >= 0.90)")
    for name, seconds, note in rows:
        per_copy = seconds / args.files * 1000
        print(f"{name:30} {seconds:9.3f} {total / seconds / 1e9:7.2f} {per_copy:8.2f}  {note}")
    print(
        f"{'copy_verify, 1-byte copies':30} {fixed:9.3f} {'-':>7} "
        f"{fixed / args.files * 1000:8.2f}  the cost per copy beside the hashing"
    )


if __name__ == "__main__":
    main()
