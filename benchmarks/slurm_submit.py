"""SLURM backend: submission throughput against bare ``sbatch``, and status polling of many jobs.

Issue 12: submission throughput to SLURM (jobs/s) as a ratio to bare ``sbatch`` in a shell loop
in the same script; status polling of 1,000 jobs submitted with ``--hold`` (then cancelled) in
one batch (time, calls).

- baseline: ``for i in ...; do sbatch --parsable --hold script; done`` in one bash process,
  each job with its own pre-written batch script (the same script the backend writes);
- backend: ``SlurmBackend.submit`` of as many JobSpecs, each with its own run directory. It does
  everything a real first submission does (resource check against the cached partition limits,
  lock, marker check, script written, ``sbatch``, index link, marker; no ``squeue`` lookup, as
  no script existed before), the only change being ``--hold`` added to ``sbatch`` so that
  nothing runs on the shared cluster;
- polling: ``--poll-jobs`` held jobs submitted by a bare loop, then ``get_status`` of all their
  ids (``--runs`` times; the SLURM commands it ran are counted), against one
  ``scontrol show job`` per id (the obvious per-job poll). All jobs are cancelled at the end.

    .venv/bin/python benchmarks/slurm_submit.py [--jobs 100] [--poll-jobs 1000] [--runs 5]

Needs a running cluster (``scripts/slurm-up.sh``). Uses a temporary directory, removed at the
end. Prints a table and exits; not a test.
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
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflow_site.settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs per submission run")
    parser.add_argument("--poll-jobs", type=int, default=1000, help="held jobs to poll")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("sbatch") is None:
        sys.exit("sbatch not found: install slurm-wlm and run scripts/slurm-up.sh")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load} at start")
    work = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    os.environ["WORKFLOW_VAR_DIR"] = str(work / "var")
    import django

    django.setup()
    submitted: list[str] = []
    try:
        run(args, work, submitted)
    finally:
        cancel(submitted)
        shutil.rmtree(work, ignore_errors=True)


def cancel(job_ids: list[str]) -> None:
    for start in range(0, len(job_ids), 500):
        subprocess.run(["scancel", *job_ids[start : start + 500]], check=False, timeout=120)


def run(args: argparse.Namespace, work: Path, submitted: list[str]) -> None:
    from pipelines.backends.base import JobSpec
    from pipelines.backends.slurm import SlurmBackend, batch_script

    class HeldSlurmBackend(SlurmBackend):
        """The real backend; its sbatch calls add --hold so no job runs."""

        def _run(self, argv, *, env=None):
            if argv[0] == "sbatch":
                argv = [argv[0], "--hold", *argv[1:]]
            return super()._run(argv, env=env)

    resources = {"cpu": 1, "memory_gb": 0.1, "time_hours": 0.1}

    def specs(kind: str, run_index: int, count: int) -> list[JobSpec]:
        tag = uuid.uuid4().hex[:6]
        return [
            JobSpec(
                name=f"bench-{kind}-{tag}-{run_index}-{i}",
                command=["true"],
                run_dir=work / f"{kind}-{tag}-{run_index}" / str(i),
                env={"WORKFLOW_OUTPUT_DIR": "/workflow/output/"},
                resources=resources,
            )
            for i in range(count)
        ]

    def bare_loop(batch: list[JobSpec]) -> tuple[float, list[str]]:
        scripts = []
        for spec in batch:
            (spec.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            script = spec.run_dir / "logs" / "job.sbatch"
            script.write_text(batch_script(spec))
            scripts.append(str(script))
        listing = work / f"scripts-{uuid.uuid4().hex[:6]}.txt"
        listing.write_text("\n".join(scripts) + "\n")
        started = time.perf_counter()
        result = subprocess.run(
            [
                "bash",
                "-c",
                'while read -r s; do sbatch --parsable --hold "$s"; done < "$1"',
                "_",
                str(listing),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=3600,
        )
        elapsed = time.perf_counter() - started
        return elapsed, [line.split(";")[0] for line in result.stdout.split()]

    # --- submission throughput ------------------------------------------------------------
    backend = HeldSlurmBackend(partition="", state_dir=work / "index")
    backend.partition_limits()  # warm the cache, as a long-running worker has it
    bare_times: list[float] = []
    backend_times: list[float] = []
    for run_index in range(args.runs):
        elapsed, ids = bare_loop(specs("bare", run_index, args.jobs))
        submitted.extend(ids)
        bare_times.append(elapsed)
        batch = specs("backend", run_index, args.jobs)
        backend.calls.clear()
        started = time.perf_counter()
        for spec in batch:
            submitted.append(backend.submit(spec))
        backend_times.append(time.perf_counter() - started)
        calls_per_job = {name: count / args.jobs for name, count in backend.calls.items()}
        cancel(submitted)
        submitted.clear()
    bare = statistics.median(bare_times)
    through = statistics.median(backend_times)
    print(f"\nsubmission of {args.jobs} held jobs, median of {args.runs} runs")
    print("| what | seconds | jobs/s | ratio |")
    print("|---|---:|---:|---|")
    print(
        f"| bare `sbatch` in a shell loop (baseline) | {bare:.3f} | {args.jobs / bare:.1f} | 1.00 |"
    )
    print(
        f"| `SlurmBackend.submit` | {through:.3f} | {args.jobs / through:.1f} | "
        f"**{bare / through:.2f} x bare sbatch** |"
    )
    print(f"SLURM commands per backend submit: {calls_per_job}")

    # --- status polling ---------------------------------------------------------------------
    print(f"\nsubmitting {args.poll_jobs} held jobs for the polling test ...", flush=True)
    _, ids = bare_loop(specs("poll", 0, args.poll_jobs))
    submitted.extend(ids)
    poller = SlurmBackend(partition="", state_dir=work / "index")
    batch_times = []
    for _ in range(args.runs):
        poller.calls.clear()
        started = time.perf_counter()
        statuses = poller.get_status(ids)
        batch_times.append(time.perf_counter() - started)
        calls = dict(poller.calls)
        assert len(statuses) == len(ids)
        assert all(status.state == "pending" for status in statuses.values())
    started = time.perf_counter()
    for job_id in ids:
        subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, check=True, timeout=30
        )
    per_job = time.perf_counter() - started
    batch_seconds = statistics.median(batch_times)
    print(f"\nstatus of {len(ids)} held jobs, median of {args.runs} polls")
    print("| what | seconds | SLURM calls | ratio |")
    print("|---|---:|---:|---|")
    print(f"| one `scontrol show job` per id (baseline) | {per_job:.3f} | {len(ids)} | 1.00 |")
    print(
        f"| `SlurmBackend.get_status(ids)` | {batch_seconds:.3f} | "
        f"{', '.join(f'{n} {c}' for n, c in calls.items())} | "
        f"**{per_job / batch_seconds:.0f} x faster** |"
    )


if __name__ == "__main__":
    main()
