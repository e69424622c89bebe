"""The workflow on REAL SLURM (issue 12 item 8), against the single-node cluster of
scripts/slurm-up.sh: skipped with a reason when it is absent, a failure under
REQUIRE_SERVICES=1.

- archived demo data triggers the demo pipelines, whose steps run as SLURM jobs (1 CPU each)
  and end as registered products with lineage (``manage.py demo --no-serve`` with
  ``HPC_BACKEND=slurm``, the laptop facility otherwise);
- a job cancelled outside the system (``scancel``) ends FAILED with SLURM's word for it, and
  the result manager retries the run as a new attempt;
- a job that exceeds its one-minute time limit ends FAILED with SLURM's reason (TIMEOUT).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.models import ExecutedReductionStep, RunStatus
from pipelines.services.results import result_manager_tick
from pipelines.services.runs import run_submit, workflow_manager_tick
from tests.conftest import require_service
from tests.pipelines.workflow_fixtures import World, world
from tests.subprocesses import manage, python
from tests.test_workflow_end_to_end import REPORT, assert_every_demo_run_completed_with_lineage

pytestmark = pytest.mark.slurm


def _cluster_answers() -> bool:
    if not shutil.which("sbatch") or not shutil.which("scancel"):
        return False
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    require_service(_cluster_answers(), "needs a running SLURM cluster: run scripts/slurm-up.sh")


@pytest.fixture
def on_slurm(slurm_cluster: None, settings: Any, tmp_path: Path) -> None:
    settings.HPC_BACKEND = "slurm"
    settings.SLURM_PARTITION = ""
    settings.SLURM_BACKEND_DIR = str(tmp_path / "slurm-index")
    settings.CONTAINER_RUNTIME = "none"


def test_archived_demo_data_runs_as_slurm_jobs_and_ends_as_registered_products(
    slurm_cluster: None, tmp_path: Path
) -> None:
    var = tmp_path / "var"
    result = manage(
        var, "demo", "--no-serve", "--count", "2", "--timeout", "400",
        timeout=500, HPC_BACKEND="slurm", SLURM_PARTITION="",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    state = json.loads(python(var, REPORT, HPC_BACKEND="slurm"))
    assert_every_demo_run_completed_with_lineage(state)
    jobs = json.loads(
        python(
            var,
            "import json\nfrom pipelines.models import ExecutedReductionStep as R\n"
            "print(json.dumps(list(R.objects.values_list('hpc_job_id', flat=True))))",
        )
    )
    # SLURM job ids (numbers), not the local backend's "local:<dir>" ids.
    assert jobs and all(job.isdigit() for job in jobs), jobs


def _submitted(w: World) -> ExecutedReductionStep:
    run = w.run()
    workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    return run_submit(run.pk, token=run.claim_token, owner="worker")


def _long_job(w: World, *, minutes: float | None = None) -> None:
    version = w.step.software_version
    version.command = ["python3", "-S", "-c", "import time; time.sleep(600)"]
    version.save()
    resources = {"cpu": 1, "memory_gb": 0.2}
    if minutes is not None:
        resources["time_hours"] = minutes / 60
    type(w.step).objects.filter(pk=w.step.pk).update(resource_requirements=resources)
    w.step.refresh_from_db()


def _poll_until(run: ExecutedReductionStep, statuses: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result_manager_tick(owner="rm")
        run.refresh_from_db()
        if run.status in statuses:
            return
        time.sleep(2)
    raise AssertionError(f"run {run.pk} is still {run.status} after {timeout} s")


def _squeue_state(job_id: str) -> str:
    result = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


@pytest.mark.django_db
def test_a_job_cancelled_outside_the_system_ends_failed_and_is_retried(
    on_slurm: None, tmp_path: Path
) -> None:
    w = world(tmp_path, packages=1, files_per_package=1)
    _long_job(w)
    run = _submitted(w)
    job = run.hpc_job_id
    assert job.isdigit()
    try:
        deadline = time.monotonic() + 60
        while _squeue_state(job) not in ("RUNNING", "") and time.monotonic() < deadline:
            time.sleep(1)
        subprocess.run(["scancel", job], check=True, timeout=30)
        # The result manager sees it FAILED and, with retries left, sends it back to PENDING
        # in the same tick; the attempt's record keeps SLURM's answer.
        _poll_until(run, {RunStatus.FAILED, RunStatus.PENDING}, timeout=90)
        attempt = run.attempts[0]
        assert attempt["outcome"] == "failed" and attempt["job_id"] == job
        assert "CANCELLED" in attempt["reason"].upper()
        if run.status == RunStatus.FAILED:
            result_manager_tick(owner="rm")
            run.refresh_from_db()
        assert run.status == RunStatus.PENDING and run.retry_count == 1
        # The retry runs as a new attempt, a new SLURM job under a new name.
        retried = _submitted_again(run)
        assert retried.hpc_job_id != job and retried.attempt == 2
    finally:
        run.refresh_from_db()
        for job_id in {job, run.hpc_job_id} - {""}:
            subprocess.run(["scancel", job_id], check=False, timeout=30)


def _submitted_again(run: ExecutedReductionStep) -> ExecutedReductionStep:
    workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    return run_submit(run.pk, token=run.claim_token, owner="worker")


@pytest.mark.django_db
def test_a_job_over_its_one_minute_time_limit_ends_failed_with_slurms_reason(
    on_slurm: None, tmp_path: Path
) -> None:
    w = world(tmp_path, packages=1, files_per_package=1)
    _long_job(w, minutes=1)
    type(w.step).objects.filter(pk=w.step.pk).update(max_retries=0)
    w.step.refresh_from_db()
    run = _submitted(w)
    try:
        # SLURM enforces the limit at its next check after the minute (up to ~30 s later).
        _poll_until(run, {RunStatus.FAILED}, timeout=180)
        assert run.failed_for_good
        assert "TIMEOUT" in run.failure_reason.upper(), run.failure_reason
    finally:
        subprocess.run(["scancel", run.hpc_job_id], check=False, timeout=30)
