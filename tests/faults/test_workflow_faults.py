"""Faults in the workflow engine, with real worker and beat processes (see ``harness``) and the
local backend: a worker killed between claim and submit, and after the backend accepted the job
but before ``hpc_job_id`` was committed (exactly one job either way); a worker killed while
collecting (collected once); a reduction that exits non-zero (retried, then FAILED with its log);
a staged input corrupted before the run (detected, not run).

Each test builds a small staged world straight in its database (``workflow_fixtures.world``: one
archived package whose files are STAGED at a processing location, a completed staging job, a
MANUAL pipeline so the trigger manager adds nothing) and one PENDING run, so the data path does
not have to run first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .harness import Facility, wait_for

# The job: writes a science product and appends a line to a counter file, so a test can tell
# how many times the job actually ran.
JOB = (
    "import os, pathlib, sys\n"
    "out = pathlib.Path(os.environ['WORKFLOW_OUTPUT_DIR'])\n"
    "(out / 'science').mkdir(parents=True, exist_ok=True)\n"
    "(out / 'science' / 'result.txt').write_text('reduced')\n"
    "(out / 'qa').mkdir(parents=True, exist_ok=True)\n"
    "(out / 'qa' / 'metrics.json').write_text('{\"rms\": 1}')\n"
    "with open(sys.argv[1], 'a') as counter: counter.write('ran\\n')\n"
)
FAILING_JOB = "import sys\nprint('calibration table missing', file=sys.stderr)\nsys.exit(3)\n"

SETUP = """
from pathlib import Path
from pipelines.models import Pipeline, ReductionSoftwareVersion, ReductionStep
from tests.pipelines.workflow_fixtures import world
w = world(Path({root!r}), packages=1, files_per_package=2)
Pipeline.objects.filter(pk=w.step.pipeline_id).update(trigger_type="manual")
ReductionSoftwareVersion.objects.filter(pk=w.step.software_version_id).update(command={command!r})
ReductionStep.objects.filter(pk=w.step.pk).update(max_retries={retries})
{corrupt}
print(w.run(max_retries={retries}, sub_group_key="scan").pk)
"""


def staged_run(
    facility: Facility, *, job: str = JOB, retries: int = 2, corrupt: bool = False
) -> tuple[int, Path, Path]:
    """(run id, processing root, counter file) of a fresh PENDING run."""
    root = facility.tmp / "world"
    counter = facility.tmp / "job-runs.txt"
    command = ["python3", "-S", "-c", job, str(counter)]
    damage = (
        "f = sorted(w.files)[0]\n(w.root / f).write_bytes(b'X' + w.files[f][1:])" if corrupt else ""
    )
    out = facility.python(
        SETUP.format(root=str(root), command=command, retries=retries, corrupt=damage)
    )
    return int(out.strip().splitlines()[-1]), root / "processing", counter


def run_row(facility: Facility, run_id: int) -> dict[str, object]:
    [row] = facility.sql(
        "SELECT status, retry_count, failed_for_good, hpc_job_id, failure_reason, log_path, "
        "attempts::text FROM executed_reduction_step WHERE id = %s",
        (run_id,),
    )
    keys = ("status", "retry_count", "failed_for_good", "hpc_job_id", "failure", "log_path",
            "attempts")  # fmt: skip
    return dict(zip(keys, row, strict=True))


def moves(facility: Facility, run_id: int) -> list[tuple[str, str, str]]:
    return [
        (row[0], row[1], row[2])
        for row in facility.sql(
            "SELECT from_state, to_state, actor FROM state_event "
            "WHERE entity = 'executed_reduction_step' AND object_id = %s ORDER BY id",
            (str(run_id),),
        )
    ]


def completed(facility: Facility, run_id: int) -> bool:
    return run_row(facility, run_id)["status"] == "completed"


def submitted_jobs(root: Path) -> list[Path]:
    """Every job the local backend started under ``root`` (one marker per started job)."""
    return sorted(root.rglob("logs/submitted.json"))


def counter_lines(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_a_worker_killed_between_claim_and_submit_leaves_exactly_one_job(
    facility: Facility,
) -> None:
    run_id, root, counter = staged_run(facility)
    victim = facility.start_worker("victim", pause="workflow.before_submit")
    facility.start_beat("beat")

    assert facility.reached("workflow.before_submit", timeout=60)["pid"] == victim.pid
    assert run_row(facility, run_id)["status"] == "staging_data"
    facility.kill("victim")
    facility.start_worker("rescuer", concurrency=2)

    wait_for(lambda: completed(facility, run_id), timeout=60, what="the run completed")
    assert ("staging_data", "pending", "recovery") in moves(facility, run_id)
    assert len(submitted_jobs(root)) == 1 and counter_lines(counter) == 1
    row = run_row(facility, run_id)
    assert row["retry_count"] == 0  # a claim that never submitted costs no retry
    assert [to for _f, to, _a in moves(facility, run_id)].count("submitted") == 1


def test_a_worker_killed_after_the_backend_accepted_the_job_leaves_exactly_one_job(
    facility: Facility,
) -> None:
    run_id, root, counter = staged_run(facility)
    victim = facility.start_worker("victim", pause="workflow.after_submit")
    facility.start_beat("beat")

    assert facility.reached("workflow.after_submit", timeout=60)["pid"] == victim.pid
    # The job runs (detached from the worker) but the run does not know its id yet.
    assert run_row(facility, run_id)["hpc_job_id"] == ""
    facility.kill("victim")
    facility.start_worker("rescuer", concurrency=2)

    wait_for(lambda: completed(facility, run_id), timeout=60, what="the run completed")
    [marker] = submitted_jobs(root)
    assert json.loads(marker.read_text())["name"] == f"run-{run_id}-1"
    assert counter_lines(counter) == 1
    assert run_row(facility, run_id)["hpc_job_id"] == json.loads(marker.read_text())["job_id"]


def test_a_worker_killed_while_collecting_results_is_replaced_and_collects_once(
    facility: Facility,
) -> None:
    run_id, root, counter = staged_run(facility)
    victim = facility.start_worker("victim", pause="results.before_register")
    facility.start_beat("beat")

    assert facility.reached("results.before_register", timeout=60)["pid"] == victim.pid
    assert run_row(facility, run_id)["status"] == "collecting_results"
    facility.kill("victim")
    facility.start_worker("rescuer", concurrency=2)

    wait_for(lambda: completed(facility, run_id), timeout=60, what="the run completed")
    products = facility.sql(
        "SELECT relative_path, count(*) FROM data_product WHERE produced_by_id = %s "
        "GROUP BY relative_path",
        (run_id,),
    )
    assert {path for path, _n in products} >= {
        "output/science/result.txt",
        "output/qa/metrics.json",
    }
    assert all(n == 1 for _path, n in products)
    copies = facility.sql(
        "SELECT count(*) FROM physical_copy c JOIN data_product p ON p.id = c.data_product_id "
        "WHERE p.produced_by_id = %s",
        (run_id,),
    )[0][0]
    assert copies == len(products)
    assert [to for _f, to, _a in moves(facility, run_id)].count("completed") == 1
    assert counter_lines(counter) == 1 and len(submitted_jobs(root)) == 1


def test_a_reduction_that_exits_non_zero_is_retried_then_stays_failed_with_its_log(
    facility: Facility,
) -> None:
    run_id, root, _counter = staged_run(facility, job=FAILING_JOB, retries=1)
    facility.start_worker("worker", concurrency=2)
    facility.start_beat("beat")

    wait_for(
        lambda: run_row(facility, run_id)["failed_for_good"],
        timeout=60,
        what="the run failed for good",
    )
    row = run_row(facility, run_id)
    assert row["status"] == "failed" and row["retry_count"] == 1
    attempts = json.loads(str(row["attempts"]))
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert all(a["exit_code"] == 3 for a in attempts)
    assert "calibration table missing" in str(row["failure"])
    log_dir = Path(str(row["log_path"]))
    assert "calibration table missing" in (log_dir / "stderr.log").read_text()
    assert [p.parent.parent.name for p in submitted_jobs(root)] == [
        f"{run_id}-1",
        f"{run_id}-2",
    ]
    # It stays failed: several more ticks of every manager (each second) neither retry nor
    # resubmit it.
    time.sleep(5)
    assert run_row(facility, run_id)["status"] == "failed"
    assert len(submitted_jobs(root)) == 2


def test_a_staged_input_corrupted_before_the_run_is_detected_and_nothing_runs(
    facility: Facility,
) -> None:
    run_id, root, counter = staged_run(facility, corrupt=True)
    facility.start_worker("worker", concurrency=2)
    facility.start_beat("beat")

    wait_for(
        lambda: run_row(facility, run_id)["status"] == "failed",
        timeout=60,
        what="the run failed",
    )
    row = run_row(facility, run_id)
    assert row["failed_for_good"] and "hashes to" in str(row["failure"])
    assert submitted_jobs(root) == [] and counter_lines(counter) == 0
    assert facility.sql(
        "SELECT integrity FROM physical_copy WHERE kind = 'raw_data_file' AND integrity <> "
        "'verified'"
    ) == [("mismatch",)]
