"""Checksum throughput of pipelines.storage.checksums against the system tools.

SPEC §9: sha256 must reach >= 0.9 x `openssl dgst -sha256` on the same files; the fast algorithm
(xxh3_128) must reach >= 3 GB/s from page cache. Each figure is the median of several runs over
files that are already in the page cache (one warm-up read first), so disk speed is out of it.

    .venv/bin/python benchmarks/checksum.py [--size-mb 512] [--files 4] [--runs 5]

Prints a table and exits; not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.storage.checksums import checksum_file


def _make_files(directory: Path, count: int, size: int) -> list[Path]:
    paths = []
    block = os.urandom(1024 * 1024)
    for i in range(count):
        path = directory / f"data_{i}.bin"
        with open(path, "wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
        paths.append(path)
    return paths


def _median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up: page cache and imports
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tool(argv: list[str], paths: list[Path]) -> Callable[[], object]:
    return lambda: subprocess.run([*argv, *map(str, paths)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="size of each file (MiB)")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-checksum-") as tmp:
        paths = _make_files(Path(tmp), args.files, args.size_mb * 1024 * 1024)
        total = sum(p.stat().st_size for p in paths)
        rows: list[tuple[str, float, str]] = []

        def ours(algorithm: str) -> Callable[[], object]:
            return lambda: [checksum_file(p, algorithm) for p in paths]

        baselines = {}
        for name, argv in (
            ("openssl dgst -sha256", ["openssl", "dgst", "-sha256"]),
            ("sha256sum", ["sha256sum"]),
            ("xxhsum -H2", ["xxhsum", "-H2"]),
        ):
            if shutil.which(argv[0]):
                baselines[name] = _median_seconds(_tool(argv, paths), args.runs)
        sha = _median_seconds(ours("sha256"), args.runs)
        xxh = _median_seconds(ours("xxh3_128"), args.runs)

        for name, seconds in baselines.items():
            rows.append((name, seconds, "baseline"))
        openssl = baselines.get("openssl dgst -sha256")
        ratio = f"{openssl / sha:.2f} x openssl (target >= 0.90)" if openssl else "no openssl"
        rows.append(("checksum_file sha256", sha, ratio))
        rows.append(
            ("checksum_file xxh3_128", xxh, f"{total / xxh / 1e9:.2f} GB/s (target >= 3 GB/s)")
        )

    print(
        f"{args.files} files x {args.size_mb} MiB = {total / 1e9:.2f} GB, page cache, "
        f"median of {args.runs} runs, {os.cpu_count()} CPUs"
    )
    print(f"{'what':28} {'seconds':>9} {'GB/s':>7}  ratio")
    for name, seconds, note in rows:
        print(f"{name:28} {seconds:9.3f} {total / seconds / 1e9:7.2f}  {note}")


if __name__ == "__main__":
    main()
