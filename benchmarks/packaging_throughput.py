"""Build throughput of ``raw_data_package_build`` against ``tar -cf`` of the same files.

SPEC §9 sets no packaging figure of its own; the nearest target is "copy with checksum computed
while copying >= 0.9 x cp". A package build reads every file once, verifying it against its
registered sha256 while reading, and writes the tar once, hashing it while writing, then fsyncs
it. The references, all on the same files from a warm page cache (every file is read once
first) into the same buffer directory:

- ``tar -cf`` (baseline): the tar alone, no checksum, no fsync;
- ``tar -cf`` + ``sync FILE``: the same plus the fsync the build does;
- ``sha256sum`` and ``openssl dgst -sha256`` of the source files: the verification alone
  (coreutils sha256sum does not use the CPU's SHA extensions here; OpenSSL, like hashlib, does);
- ``openssl dgst -sha256`` of the files, then ``tar -cf - | tee FILE | openssl dgst -sha256``
  and ``sync FILE``: the same work as the build, done by the system tools.

Each build packages a new scan whose files are hard links to the same data (same inodes, so the
same cached pages), planned with ``raw_data_packages_plan`` and claimed with
``operation_claim_batch`` outside the timing; the timing covers ``raw_data_package_build`` (its
queries, the tar, the fsync and the completion). The database is SQLite in the temporary
directory: it serves a handful of queries per build and is not the bottleneck.

    .venv/bin/python benchmarks/packaging_throughput.py [--files 20] [--size-mb 50] [--runs 3]

Prints a table and exits; not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from _django import django_environment, machine_line


def _make_files(directory: Path, count: int, size: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"data_{i:03d}.bin"
        block = os.urandom(1024 * 1024)  # a different block per file: no two files alike
        with open(path, "wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
        paths.append(path)
    return paths


def _sh(command: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=50, help="size of each file (MiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one more build")
    args = parser.parse_args()
    header = machine_line()
    with django_environment("packaging-throughput", postgres_db=None) as tmp:
        run(args, header, tmp)


def run(args: argparse.Namespace, header: str, tmp: Path) -> None:
    import shlex

    from pipelines.demo.facility import demo_facility_load
    from pipelines.models import (
        DataLocation,
        ExecutedObsUnit,
        InstrumentModule,
        ObsUnit,
        RawDataFile,
        RawDataPackage,
    )
    from pipelines.services.operations import operation_claim_batch
    from pipelines.services.packaging import raw_data_package_build, raw_data_packages_plan
    from pipelines.storage.checksums import checksum_file

    demo_facility_load()
    source = DataLocation.objects.get(site__short_name="ccat", name="chai_raw_data")
    buffer = DataLocation.objects.get(site__short_name="ccat", name="buffer")
    source_root, buffer_root = Path(source.root_path), Path(buffer.root_path)
    module = InstrumentModule.objects.get(instrument__name="CHAI", name="LFA")
    obs_unit = ObsUnit.objects.order_by("pk").first()

    data = _make_files(source_root / "data", args.files, args.size_mb * 1024 * 1024)
    checksums = {path: checksum_file(path, "sha256") for path in data}  # also warms the cache
    total = sum(p.stat().st_size for p in data)
    names = " ".join(shlex.quote(str(p.relative_to(source_root))) for p in data)
    out = buffer_root / "reference.tar"
    quoted_out = shlex.quote(str(out))
    cd = f"cd {shlex.quote(str(source_root))} && "
    _sh(f"{cd}cat {names} > /dev/null")

    def new_claimed_package() -> tuple[int, str]:
        """A new finished scan whose files are hard links to the data; planned and claimed."""
        scan = ExecutedObsUnit.objects.create(
            obs_unit=obs_unit,
            start_time="2026-01-01T00:00:00Z",
            end_time="2026-01-01T01:00:00Z",
            status=ExecutedObsUnit.ObsStatus.COMPLETED,
        )
        scan_dir = source_root / "raw" / str(scan.pk)
        scan_dir.mkdir(parents=True)
        for path in data:
            link = scan_dir / path.name
            os.link(path, link)
            RawDataFile.objects.create(
                id=uuid.uuid4(),
                name=path.name,
                relative_path=str(link.relative_to(source_root)),
                size=path.stat().st_size,
                checksum=checksums[path],
                executed_obs_unit=scan,
                instrument_module=module,
                source_location=source,
            )
        planned = raw_data_packages_plan()
        if planned.packages != 1:
            raise SystemExit(f"expected one package, planned {planned}")
        claim = operation_claim_batch(RawDataPackage, owner="bench", limit=1)
        return claim.ids[0], claim.token

    def build() -> float:
        pk, token = new_claimed_package()
        start = time.perf_counter()
        package = raw_data_package_build(pk, token=token, owner="bench")
        seconds = time.perf_counter() - start
        if package.size < total:
            raise SystemExit(f"package {package} is {package.size} bytes, data {total}")
        (buffer_root / package.relative_path).unlink()
        return seconds

    def tool(command: str) -> Callable[[], float]:
        def timed() -> float:
            start = time.perf_counter()
            _sh(command)
            seconds = time.perf_counter() - start
            out.unlink(missing_ok=True)
            return seconds

        return timed

    sides: dict[str, Callable[[], float]] = {
        "tar -cf (baseline)": tool(f"{cd}tar -cf {quoted_out} {names}"),
        "tar -cf + sync FILE": tool(f"{cd}tar -cf {quoted_out} {names} && sync {quoted_out}"),
        "sha256sum of the files": tool(f"{cd}sha256sum {names} > /dev/null"),
        "openssl dgst -sha256 of the files": tool(f"{cd}openssl dgst -sha256 {names} > /dev/null"),
        "same work with tools (openssl, tar|tee)": tool(
            f"{cd}openssl dgst -sha256 {names} > /dev/null && tar -cf - {names} "
            f"| tee {quoted_out} | openssl dgst -sha256 > /dev/null && sync {quoted_out}"
        ),
        "raw_data_package_build": build,
    }
    for fn in sides.values():  # warm-up: imports, first tar, first queries
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    names_order = list(sides)
    for run_index in range(args.runs):
        shift = run_index % len(names_order)
        for name in names_order[shift:] + names_order[:shift]:
            times[name].append(sides[name]())

    print(
        f"{args.files} files x {args.size_mb} MiB = {total / 1e9:.2f} GB, page cache warm, "
        f"tar written to the buffer location on the same disk, median of {args.runs} runs; "
        f"SQLite; {header}"
    )
    tar = statistics.median(times["tar -cf (baseline)"])
    print(f"{'what':42} {'seconds':>8} {'MB/s':>7}  ratio")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        note = "baseline" if name.endswith("(baseline)") else f"{tar / seconds:.2f} x tar -cf"
        print(f"{name:42} {seconds:8.3f} {total / seconds / 1e6:7.0f}  {note}")
    print(
        "runs (s): "
        + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in s)}" for n, s in times.items())
    )

    if args.profile:
        pk, token = new_claimed_package()
        profiler = cProfile.Profile()
        profiler.enable()
        raw_data_package_build(pk, token=token, owner="bench")
        profiler.disable()
        report = io.StringIO()
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(12)
        print(report.getvalue())


if __name__ == "__main__":
    main()
