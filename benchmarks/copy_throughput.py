"""``pipelines.storage.base.copy`` between two disk locations against ``cp`` of the same file.

SPEC §9: "copy with checksum computed while copying >= 0.9 x cp"; for sha256 the fair reference
is the slower of ``cp`` and ``openssl dgst -sha256`` (a copy hashed with sha256 cannot beat the
hash alone). Our copy (``PosixStorage.put_stream``) writes a temporary file, hashes every chunk
as it goes out, fsyncs the file, renames it and fsyncs the directory; plain ``cp`` does neither
fsync. So every ratio is given twice:

- against ``cp --reflink=never`` (what the SPEC names; not durable when it returns), and
- against ``cp --reflink=never`` + ``sync FILE DIR`` (the same durability as our copy).

Also timed, for reading the sha256 figures: ``openssl dgst -sha256`` of the source, and the
same work as our sha256 copy done by the tools (``tee FILE < SRC | openssl dgst -sha256`` then
``sync FILE DIR``).

One source file (default 1 GiB, random bytes) in a source directory, copied into a second
directory on the same file system; both are ``PosixStorage`` roots built directly (no database).
The source is read once first, so the page cache is warm for every side. Between timed runs the
copy is removed and ``sync -f`` flushes the file system outside the timing, so no run pays for
the previous run's write-back. The sides are interleaved and their order rotated per run; each
figure is the median.

    .venv/bin/python benchmarks/copy_throughput.py [--size-mb 1024] [--runs 5] [--dir /tmp]

Prints a table and exits; not a test. (Not named ``copy.py``: in this directory, which is
``sys.path[0]`` for every script here, that would shadow the standard library's ``copy``.)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.storage.base import copy
from pipelines.storage.checksums import checksum_file
from pipelines.storage.posix import PosixStorage


def _make_file(path: Path, size: int) -> None:
    block_size = 1024 * 1024
    with open(path, "wb") as handle:
        for _ in range(size // block_size):
            handle.write(os.urandom(block_size))


def _sh(command: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the file (MiB)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to make the temporary directory")
    args = parser.parse_args()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = f"{os.cpu_count()} CPUs, load average {load} at start"

    with tempfile.TemporaryDirectory(prefix="bench-copy-", dir=args.dir) as tmp:
        src_root, dst_root = Path(tmp) / "source", Path(tmp) / "dest"
        src_root.mkdir()
        dst_root.mkdir()
        source_file = src_root / "data.bin"
        _make_file(source_file, args.size_mb * 1024 * 1024)
        total = source_file.stat().st_size
        expected = {a: checksum_file(source_file, a) for a in ("sha256", "xxh3_128")}  # warms
        _sh(f"sync -f {shlex.quote(tmp)}")
        source = PosixStorage(src_root, label="bench:source")
        dest = PosixStorage(dst_root, label="bench:dest")
        src, dst, dst_dir = (
            shlex.quote(str(p)) for p in (source_file, dst_root / "copy.bin", dst_root)
        )

        def settle() -> None:
            """Outside the timing: remove the copy and let the disk finish writing."""
            for leftover in dst_root.iterdir():
                leftover.unlink()
            _sh(f"sync -f {shlex.quote(tmp)}")

        def tool(command: str) -> Callable[[], float]:
            def timed() -> float:
                start = time.perf_counter()
                _sh(command)
                seconds = time.perf_counter() - start
                settle()
                return seconds

            return timed

        def ours(algorithm: str) -> Callable[[], float]:
            def timed() -> float:
                start = time.perf_counter()
                digest, size = copy(source, "data.bin", dest, "copy.bin", algorithm=algorithm)
                seconds = time.perf_counter() - start
                if (digest, size) != (expected[algorithm], total):
                    raise SystemExit(f"copy with {algorithm} returned {digest} {size}")
                settle()
                return seconds

            return timed

        sides: dict[str, Callable[[], float]] = {
            "cp --reflink=never": tool(f"cp --reflink=never {src} {dst}"),
            "cp --reflink=never + sync FILE DIR": tool(
                f"cp --reflink=never {src} {dst} && sync {dst} {dst_dir}"
            ),
            "openssl dgst -sha256 SRC": tool(f"openssl dgst -sha256 {src} > /dev/null"),
            "tee FILE | openssl dgst -sha256 + sync": tool(
                f"tee {dst} < {src} | openssl dgst -sha256 > /dev/null && sync {dst} {dst_dir}"
            ),
            "copy(..., algorithm='xxh3_128')": ours("xxh3_128"),
            "copy(..., algorithm='sha256')": ours("sha256"),
        }
        for fn in sides.values():  # warm-up: imports, first allocation of the file's blocks
            fn()
        times: dict[str, list[float]] = {name: [] for name in sides}
        order = list(sides)
        for run_index in range(args.runs):
            shift = run_index % len(order)
            for name in order[shift:] + order[:shift]:
                times[name].append(sides[name]())

    median = {name: statistics.median(samples) for name, samples in times.items()}
    cp, cp_sync = median["cp --reflink=never"], median["cp --reflink=never + sync FILE DIR"]
    openssl = median["openssl dgst -sha256 SRC"]
    xxh, sha = median["copy(..., algorithm='xxh3_128')"], median["copy(..., algorithm='sha256')"]
    sha_ref, sha_ref_sync = max(cp, openssl), max(cp_sync, openssl)
    notes = {
        "cp --reflink=never": "baseline",
        "cp --reflink=never + sync FILE DIR": "baseline (same durability as ours)",
        "openssl dgst -sha256 SRC": "hash alone",
        "tee FILE | openssl dgst -sha256 + sync": "our sha256 copy's work, done by tools",
        "copy(..., algorithm='xxh3_128')": (
            f"{cp / xxh:.2f} x cp; {cp_sync / xxh:.2f} x cp+sync (target >= 0.90)"
        ),
        "copy(..., algorithm='sha256')": (
            f"{sha_ref / sha:.2f} x max(cp, openssl); "
            f"{sha_ref_sync / sha:.2f} x max(cp+sync, openssl) (target >= 0.90)"
        ),
    }
    print(
        f"1 file of {total / 2**20:.0f} MiB ({total / 1e9:.2f} GB), page cache warm, copied "
        f"between two directories of one file system, median of {args.runs} runs; {header}"
    )
    print(f"{'what':40} {'seconds':>8} {'MB/s':>7}  ratio")
    for name, seconds in median.items():
        print(f"{name:40} {seconds:8.3f} {total / seconds / 1e6:7.0f}  {notes[name]}")
    print(
        "runs (s): "
        + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in s)}" for n, s in times.items())
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load} at the end; fs of the temporary directory: {_fs_line(args.dir)}")


def _fs_line(directory: str | None) -> str:
    where = directory or tempfile.gettempdir()
    found = shutil.which("findmnt")
    if not found:
        return where
    result = subprocess.run(
        [found, "-n", "-o", "SOURCE,FSTYPE", "-T", where], capture_output=True, text=True
    )
    return " ".join(result.stdout.split()) or where


if __name__ == "__main__":
    main()
