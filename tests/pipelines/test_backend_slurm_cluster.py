"""The SLURM backend against the real single-node cluster of scripts/slurm-up.sh.

Skipped with a reason when sbatch or the cluster is missing (fails under REQUIRE_SERVICES=1).
Every job asks for one CPU and little memory (the cluster has 2 CPUs shared with other tests) and
a unique name, so runs of other tests or deployments on the same cluster never match.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from pipelines.backends.base import BackendError, JobSpec, JobStatus, get_backend, read_json
from pipelines.backends.slurm import SlurmBackend
from tests.conftest import require_service

pytestmark = pytest.mark.slurm

SMALL = {"cpu": 1, "memory_gb": 0.1, "time_hours": 0.1}


def _cluster_answers() -> bool:
    if not shutil.which("sbatch") or not shutil.which("squeue"):
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
def backend(slurm_cluster: None, tmp_path: Path) -> SlurmBackend:
    return SlurmBackend(partition="", state_dir=tmp_path / "index")


def _spec(tmp_path: Path, script: str, resources: dict | None = None) -> JobSpec:
    tag = uuid.uuid4().hex[:10]
    return JobSpec(
        name=f"run-test-{tag}",
        command=["bash", "-c", script],
        run_dir=tmp_path / f"attempt-{tag}",
        env={"GREETING": "hello from the job"},
        resources=SMALL if resources is None else resources,
    )


def _wait(backend: SlurmBackend, job_id: str, *, seconds: float = 90) -> JobStatus:
    deadline = time.monotonic() + seconds
    status = backend.get_status([job_id])[job_id]
    while not status.is_finished:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False, timeout=15)
            pytest.fail(f"job {job_id} did not finish within {seconds:g} s; last: {status}")
        time.sleep(0.5)
        status = backend.get_status([job_id])[job_id]
    return status


def _wait_running(backend: SlurmBackend, job_id: str, *, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while backend.get_status([job_id])[job_id].state != "running":
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], check=False, timeout=15)
            pytest.fail(f"job {job_id} did not start within {seconds:g} s")
        time.sleep(0.3)


@pytest.mark.parametrize(("code", "state"), [(0, "completed"), (3, "failed")])
def test_a_submitted_job_runs_and_ends_with_its_exit_code(
    backend: SlurmBackend, tmp_path: Path, code: int, state: str
) -> None:
    spec = _spec(tmp_path, f'echo "$GREETING"; echo to stderr >&2; exit {code}')

    job_id = backend.submit(spec)
    status = _wait(backend, job_id)

    assert job_id.isdigit()
    assert status.state == state
    assert status.exit_code == code
    assert status.reason == ("" if code == 0 else "exit code 3")
    assert status.wall_seconds is not None and status.finished_at is not None
    ended = read_json(spec.run_dir / "logs" / "exit_code")
    assert ended is not None and ended["exit_code"] == code
    assert ended["slurm_job_id"] == job_id
    logs = backend.get_logs(job_id)
    assert "hello from the job" in logs
    assert "to stderr" in logs
    script = (spec.run_dir / "logs" / "job.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --time=00:06:00" in script


def test_the_registry_builds_the_slurm_backend(slurm_cluster: None, settings, tmp_path) -> None:
    settings.SLURM_PARTITION = ""
    settings.SLURM_BACKEND_DIR = tmp_path / "index"

    backend = get_backend("slurm")

    assert isinstance(backend, SlurmBackend)
    assert backend.state_dir == tmp_path / "index"


def test_a_retried_submit_finds_the_job_by_name_and_starts_no_second_one(
    backend: SlurmBackend, tmp_path: Path
) -> None:
    spec = _spec(tmp_path, "sleep 2")
    first = backend.submit(spec)
    # A first submission has nothing to find: no script yet, so no squeue lookup.
    assert "squeue" not in backend.calls
    # A submitter killed after sbatch answered but before it wrote its marker: the retry, in a
    # new worker, must find the job through squeue by its name.
    (spec.run_dir / "logs" / "submitted.json").unlink()
    retry = SlurmBackend(partition="", state_dir=tmp_path / "index")

    again = retry.submit(spec)
    assert retry.find(spec) == first
    _wait(backend, first)
    after_end = retry.submit(spec)

    assert again == first == after_end
    assert backend.calls["sbatch"] == 1
    assert "sbatch" not in retry.calls
    names = subprocess.run(
        ["squeue", "--states=all", f"--name={spec.name}", "-h", "-o", "%i"],
        capture_output=True,
        text=True,
        check=True,
        timeout=15,
    ).stdout.split()
    assert names == [first]


def test_status_of_a_batch_is_one_squeue_call(backend: SlurmBackend, tmp_path: Path) -> None:
    ids = [backend.submit(_spec(tmp_path, f"exit {code}")) for code in (0, 1, 2)]
    for job_id in ids:
        _wait(backend, job_id)
    backend.calls.clear()

    statuses = backend.get_status([*ids, "not-a-slurm-id"])

    assert backend.calls == {"squeue": 1}
    assert [statuses[job_id].exit_code for job_id in ids] == [0, 1, 2]
    assert statuses["not-a-slurm-id"].state == "failed"
    assert "unknown job" in statuses["not-a-slurm-id"].reason


def test_a_job_cancelled_outside_the_system_ends_failed_with_slurms_reason(
    backend: SlurmBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path, "sleep 60"))
    _wait_running(backend, job_id)

    subprocess.run(["scancel", job_id], check=True, timeout=15)
    status = _wait(backend, job_id, seconds=30)

    assert status.state == "failed"
    assert status.reason.startswith("SLURM CANCELLED")
    assert "cancelled in SLURM" in status.reason


def test_cancel_stops_a_running_job_and_is_quiet_once_it_ended(
    backend: SlurmBackend, tmp_path: Path
) -> None:
    job_id = backend.submit(_spec(tmp_path, "sleep 60"))
    _wait_running(backend, job_id)

    backend.cancel(job_id)
    status = _wait(backend, job_id, seconds=30)
    backend.cancel(job_id)  # already ended: nothing to do, no error

    assert status.state == "failed"
    assert "CANCELLED" in status.reason


def test_cancel_of_a_job_nobody_knows_is_an_error(backend: SlurmBackend) -> None:
    with pytest.raises(BackendError, match="SLURM job 67000001: SLURM does not know it"):
        backend.cancel("67000001")
    with pytest.raises(BackendError, match="not a SLURM job id"):
        backend.cancel("run-1-1")


def test_a_job_slurm_forgot_without_an_exit_code_is_lost(
    backend: SlurmBackend, tmp_path: Path
) -> None:
    """SLURM purges finished jobs after MinJobAge and loses jobs when its state is reset; the
    index still names the run directory, which holds no exit code: the job is lost."""
    forgotten, finished = "67000002", "67000003"
    for job_id in (forgotten, finished):
        run_dir = tmp_path / f"attempt-{job_id}"
        (run_dir / "logs").mkdir(parents=True)
        backend._register(job_id, run_dir)
    (tmp_path / f"attempt-{finished}" / "logs" / "exit_code").write_text(
        '{"exit_code": 0, "reason": "", "wall_seconds": 4.5}'
    )

    statuses = backend.get_status([forgotten, finished, "67000004"])

    assert statuses[forgotten].state == "failed"
    assert statuses[forgotten].reason.startswith("lost: SLURM no longer knows job 67000002")
    assert statuses[finished].state == "completed"
    assert statuses[finished].wall_seconds == 4.5
    assert statuses["67000004"].reason.startswith("unknown job")


def test_resources_beyond_the_partition_are_refused_and_nothing_is_submitted(
    backend: SlurmBackend, tmp_path: Path
) -> None:
    cpus = backend.partition_limits().max_cpus
    spec = _spec(tmp_path, "exit 0", resources={"cpu": cpus + 1})

    with pytest.raises(ValidationError, match=f"resource 'cpu' = {cpus + 1} is beyond SLURM"):
        backend.submit(spec)
    backend.validate_resources({"cpu": 1, "memory_gb": 1, "time_hours": 1 / 60})

    assert "sbatch" not in backend.calls


def test_an_unknown_partition_is_refused_naming_the_known_ones(
    slurm_cluster: None, tmp_path: Path
) -> None:
    backend = SlurmBackend(partition="no-such-partition", state_dir=tmp_path)

    with pytest.raises(ValidationError, match="'no-such-partition' does not exist; partitions:"):
        backend.validate_resources({"cpu": 1})


def test_a_job_past_its_one_minute_limit_ends_failed_with_slurms_timeout(
    backend: SlurmBackend, tmp_path: Path
) -> None:
    """About 1.5 to 2 minutes: SLURM enforces time limits on its own schedule (up to a minute
    late) and then allows KillWait. The command sleeps longer than any of that."""
    spec = _spec(
        tmp_path, "sleep 240", resources={"cpu": 1, "memory_gb": 0.1, "time_hours": 1 / 60}
    )

    job_id = backend.submit(spec)
    status = _wait(backend, job_id, seconds=200)

    assert "#SBATCH --time=00:01:00" in (spec.run_dir / "logs" / "job.sbatch").read_text()
    assert status.state == "failed"
    assert status.reason.startswith("SLURM TIMEOUT: the job ran past its time limit")
    assert "TimeLimit" in status.reason
