"""The local backend's cost per job: submit -> exit code on disk, against a bare process spawn.

Each job is ``python3 -S -c pass`` (a fixed, near-empty process; the interpreter running this
script, resolved past any symlink or shim). Timed per job, interleaved so that both sides see
the same machine load:

- ``bare spawn``: ``subprocess.Popen(argv).wait()``, the least any backend can cost;
- ``local backend``: ``LocalBackend.submit(spec)`` until the exit code is on disk and
  ``get_status`` has read it (the file looked for every 2 ms, then one status call, as the
  pushed completion task does), i.e. what the result-manager sees with no poll interval at
  all; split into the ``submit`` call itself and the wait; plus the job's own lifetime as the
  wrapper measured it (``wall_seconds``, spawn to exit of the command), which the
  orchestration benchmark subtracts from a chain's wall time.

Then a batch: N jobs submitted back to back, waited for together (jobs per second).

Backend overhead per job = local backend median - bare spawn median: the wrapper's own Python
start-up (``-S``, no site-packages, ``os``/``sys``/``_signal``/``time`` only), the lock and
marker files, the detached session, and the exit-code write. No database and no Celery: the
backend is built directly on a temporary state directory.

    .venv/bin/python benchmarks/local_backend.py [--jobs 40] [--dir /tmp]

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.backends.base import JobSpec
from pipelines.backends.local import LocalBackend

# How often the exit-code file is looked for: often enough to add little latency, seldom enough
# that the looking does not take the CPU from the job (2 cores, shared).
POLL_SECONDS = 0.002


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _wait(backend: LocalBackend, job_id: str, run_dir: Path, timeout: float = 60) -> float | None:
    """Wait for the job's exit code (a stat every millisecond: cheap enough not to compete with
    the job for the CPU, as polling the full status would), then read its status once, as the
    pushed completion task does. Returns the job's lifetime as the wrapper measured it."""
    deadline = time.monotonic() + timeout
    exit_code = run_dir / "logs" / "exit_code"
    while not exit_code.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{job_id} did not finish within {timeout} s")
        time.sleep(POLL_SECONDS)
    status = backend.get_status([job_id])[job_id]
    if status.state != "completed":
        raise SystemExit(f"{job_id} failed: {status.reason}")
    return status.wall_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=40, help="jobs per side (default 40)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where run dirs go")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    # The interpreter itself, not whatever ``python3`` is on PATH: a pyenv shim there is a bash
    # script that costs more than the interpreter's start.
    argv = [os.path.realpath(sys.executable), "-S", "-c", "pass"]
    root = Path(tempfile.mkdtemp(prefix="local-backend-bench-", dir=args.dir))
    backend = LocalBackend(state_dir=root / "jobs")
    try:
        # Warm the page cache and the interpreter's files for both sides.
        subprocess.run(argv, check=True)
        warm = backend.submit(JobSpec(name="warm-0", command=argv, run_dir=root / "warm"))
        _wait(backend, warm, root / "warm")

        bare, submit_calls, backend_total, lifetimes = [], [], [], []
        for index in range(args.jobs):
            start = time.perf_counter()
            subprocess.Popen(argv).wait()
            bare.append(time.perf_counter() - start)

            spec = JobSpec(name=f"bench-{index}", command=argv, run_dir=root / f"run-{index}")
            start = time.perf_counter()
            job_id = backend.submit(spec)
            submitted = time.perf_counter()
            lifetime = _wait(backend, job_id, spec.run_dir)
            finished = time.perf_counter()
            submit_calls.append(submitted - start)
            backend_total.append(finished - start)
            if lifetime is not None:
                lifetimes.append(lifetime)

        start = time.perf_counter()
        ids = [
            backend.submit(
                JobSpec(name=f"batch-{index}", command=argv, run_dir=root / f"batch-{index}")
            )
            for index in range(args.jobs)
        ]
        for index, job_id in enumerate(ids):
            _wait(backend, job_id, root / f"batch-{index}")
        batch = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def row(label: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"| {label} | {statistics.median(ms):.1f} | {_percentile(ms, 0.95):.1f} | "
            f"{min(ms):.1f} | {max(ms):.1f} |"
        )

    shown = " ".join(["python3", *argv[1:]])
    print(f"{args.jobs} jobs of `{shown}` per side, {os.cpu_count()} CPUs")
    print()
    print("| per job | median ms | p95 ms | min ms | max ms |")
    print("|---|---|---|---|---|")
    print(row("bare spawn (Popen + wait)", bare))
    print(row("local backend: submit -> finished status", backend_total))
    print(row("  of which the submit call", submit_calls))
    print(row("  job lifetime measured by the wrapper", lifetimes))
    overhead = statistics.median(backend_total) - statistics.median(bare)
    print()
    print(f"backend overhead per job (median difference): {overhead * 1000:.1f} ms")
    print(
        f"batch: {args.jobs} jobs submitted back to back and awaited: {batch:.2f} s, "
        f"{args.jobs / batch:.1f} jobs/s"
    )


if __name__ == "__main__":
    main()
