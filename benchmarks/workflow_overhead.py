"""Orchestration overhead per step of the workflow engine: a chain of N steps (default 40), each
a fixed ``python3 -S -c pass`` run as its own process on the local backend, through the real
managers and Celery, next to a raw Celery chain of the same processes in the same script.

The engine: one pipeline whose N steps each depend on the one before (``group_by`` ``[]``, one
archived package already staged at the processing location), a Celery worker in this process
(thread pool, Redis DB 9 as broker) on the workflow queues. The first run is created and
submitted by one trigger evaluation and one workflow tick; from then on each job's end is pushed
by the local backend's wrapper (``run_job_finished``), which collects the run, evaluates the
triggers and ticks the workflow manager in the same task, so the next step's ``submit_run`` is
queued at once. A slow safety ticker (every ``--safety-tick`` seconds, default 5) runs the
trigger, workflow, staging and result managers as beat would; the table says how often it found work
(0 means every step advanced on the push alone).

    overhead per step = (wall time of the chain - sum of the step processes' lifetimes from
                         spawn to exit, as the backend measures them) / N

The wall time runs from the first evaluation to the last run's COMPLETED (its ``finished_at``).
The Celery baseline chains N tasks (``chain(...)``) that each run the same process with
``subprocess.run``; its lifetimes are measured around that call.

    .venv/bin/python benchmarks/workflow_overhead.py [--steps 40] [--database postgres|sqlite]

Needs Redis on 127.0.0.1:6379 (DB 9, flushed before and after) and, for ``postgres``,
PostgreSQL on 127.0.0.1:5432 (database ``bench_workflow_overhead``, created and dropped). Prints
a table and exits; not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from _django import ROOT, django_environment, machine_line

STEP = ["python3", "-S", "-c", "pass"]


def build_chain(tmp: Path, steps: int) -> list[int]:
    """The pipeline of ``steps`` chained steps; returns their ids in order."""
    sys.path.insert(0, str(ROOT))
    from pipelines.models import Pipeline, ReductionStep
    from pipelines.services.pipelines import reduction_step_set_dependencies
    from tests.factories import ReductionStepFactory
    from tests.pipelines.workflow_fixtures import world

    w = world(tmp / "world", packages=1, files_per_package=1)
    Pipeline.objects.filter(pk=w.step.pipeline_id).update(trigger_type="continuous")
    ReductionStep.objects.filter(pk=w.step.pk).update(group_by=[], cooldown_seconds=0)
    chain = [w.step]
    for index in range(1, steps):
        step = ReductionStepFactory(
            pipeline=w.step.pipeline,
            name=f"step{index:03d}",
            step_order=index + 1,
            group_by=[],
            cooldown_seconds=0,
            software=w.step.software,
            software_version=w.step.software_version,
        )
        reduction_step_set_dependencies(step, [chain[-1]])
        chain.append(step)
    w.step.software_version.command = STEP
    w.step.software_version.save(update_fields=["command"])
    return [step.pk for step in chain]


def run_engine(step_ids: list[int], *, timeout: float, safety_tick: float) -> dict[str, float]:
    from django.db import connection
    from django.utils import timezone

    from pipelines.managers import manager_tick
    from pipelines.models import ExecutedReductionStep, RunStatus
    from pipelines.queues import DEFAULT_QUEUE, MANAGERS_QUEUE, discover_queues
    from pipelines.runner import embedded_worker
    from pipelines.services.runs import workflow_manager_tick
    from pipelines.services.triggers import trigger_evaluate_now

    stop = threading.Event()
    safety_work = 0

    def safety() -> None:
        nonlocal safety_work
        try:
            while not stop.wait(safety_tick):
                for name in ("trigger", "workflow", "staging", "result"):
                    counts = manager_tick(name, owner="bench-safety")
                    found = {k: v for k, v in counts.items() if v and k not in ("active",)}
                    safety_work += bool(found)
        finally:
            connection.close()

    queues = [*discover_queues(include_workflow=True), MANAGERS_QUEUE, DEFAULT_QUEUE]
    last = step_ids[-1]
    with embedded_worker(queues, concurrency=2):
        time.sleep(1.0)  # the worker connects to the broker
        ticker = threading.Thread(target=safety, daemon=True)
        ticker.start()
        started = timezone.now()
        trigger_evaluate_now(owner="bench")
        workflow_manager_tick(owner="bench")
        deadline = time.monotonic() + timeout
        while True:
            done = ExecutedReductionStep.objects.filter(
                reduction_step_id=last, status=RunStatus.COMPLETED
            ).first()
            if done is not None:
                break
            failed = ExecutedReductionStep.objects.filter(status=RunStatus.FAILED).first()
            if failed is not None:
                raise SystemExit(f"run {failed.pk} failed: {failed.failure_reason}")
            if time.monotonic() > deadline:
                progress = ExecutedReductionStep.objects.filter(status=RunStatus.COMPLETED)
                raise SystemExit(
                    f"the chain did not finish in {timeout:g}s ({progress.count()} done)"
                )
            time.sleep(0.05)
        stop.set()
        ticker.join(safety_tick + 30)
    runs = list(ExecutedReductionStep.objects.filter(reduction_step_id__in=step_ids))
    assert len(runs) == len(step_ids), f"{len(runs)} runs for {len(step_ids)} steps"
    assert done.finished_at is not None
    wall = (done.finished_at - started) / timedelta(seconds=1)
    lifetimes = sum(run.wall_time_seconds or 0.0 for run in runs)
    print_breakdown(runs, step_ids)
    return {"wall": wall, "lifetimes": lifetimes, "safety": float(safety_work)}


SEGMENTS = (
    ("previous COMPLETED -> created", None, "created"),
    ("created -> staging_data", "created", "staging_data"),
    ("staging_data -> submitted", "staging_data", "submitted"),
    ("submitted -> running", "submitted", "running"),
    ("running -> collecting_results", "running", "collecting_results"),
    ("collecting_results -> completed", "collecting_results", "completed"),
)


def print_breakdown(runs: list, step_ids: list[int]) -> None:
    """Median time of each stretch of a step's life, from the runs' state events: where the
    overhead goes (the job itself lies inside submitted -> collecting_results)."""
    import statistics

    from pipelines.models import StateEvent

    table = runs[0]._meta.db_table
    moments: dict[str, dict[str, float]] = {
        str(run.pk): {"created": run.created_at.timestamp()} for run in runs
    }
    for object_id, to_state, at in StateEvent.objects.filter(
        entity=table, field="status", object_id__in=list(moments)
    ).values_list("object_id", "to_state", "created_at"):
        moments[object_id].setdefault(to_state, at.timestamp())  # the first time it got there
    order = {step: index for index, step in enumerate(step_ids)}
    chain = sorted(runs, key=lambda run: order[run.reduction_step_id])
    print("# median per step, ms (from state events):")
    for label, start, end in SEGMENTS:
        values = []
        for previous, run in zip([None, *chain], chain, strict=False):
            m = moments[str(run.pk)]
            if start is None:
                if previous is None:
                    continue
                begin = moments[str(previous.pk)].get("completed")
            else:
                begin = m.get(start)
            if begin is not None and end in m:
                values.append((m[end] - begin) * 1000)
        if values:
            print(f"#   {label:<34} {statistics.median(values):8.1f}")


def run_celery_chain(steps: int, *, timeout: float) -> dict[str, float]:
    from celery import chain

    from pipelines.queues import DEFAULT_QUEUE
    from pipelines.runner import embedded_worker
    from workflow_site.celery import app

    lifetimes: list[float] = []
    finished = threading.Event()

    @app.task(name="benchmarks.workflow_overhead.chain_step")
    def chain_step(index: int, last: int) -> None:
        began = time.perf_counter()
        subprocess.run(STEP, check=True)
        lifetimes.append(time.perf_counter() - began)
        if index == last:
            finished.set()

    with embedded_worker([DEFAULT_QUEUE], concurrency=2):
        time.sleep(1.0)
        began = time.perf_counter()
        chain(*[chain_step.si(i, steps - 1).set(queue=DEFAULT_QUEUE) for i in range(steps)])()
        if not finished.wait(timeout):
            raise SystemExit(f"the Celery chain did not finish in {timeout:g}s")
        wall = time.perf_counter() - began
    return {"wall": wall, "lifetimes": sum(lifetimes), "safety": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--safety-tick", type=float, default=5.0)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    print(f"# {machine_line()}; {args.steps} steps of {' '.join(STEP)}")
    # Task lines at INFO would time the terminal, not the engine.
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    postgres = "bench_workflow_overhead" if args.database == "postgres" else None
    with django_environment("workflow-overhead", postgres_db=postgres) as tmp:
        from django.core.management import call_command

        call_command("createcachetable", verbosity=0)
        step_ids = build_chain(tmp, args.steps)
        engine = run_engine(step_ids, timeout=args.timeout, safety_tick=args.safety_tick)
        celery = run_celery_chain(args.steps, timeout=args.timeout)
    n = args.steps
    print(f"{'chain':<28} {'wall s':>8} {'sum of processes s':>19} {'overhead/step ms':>17} "
          f"{'wall/step ms':>13} {'safety ticks with work':>23}")  # fmt: skip
    for name, r in ((f"workflow engine ({args.database})", engine), ("raw Celery chain", celery)):
        overhead = (r["wall"] - r["lifetimes"]) / n * 1000
        print(
            f"{name:<28} {r['wall']:>8.2f} {r['lifetimes']:>19.2f} {overhead:>17.1f} "
            f"{r['wall'] / n * 1000:>13.1f} {int(r['safety']):>23}"
        )


if __name__ == "__main__":
    main()
