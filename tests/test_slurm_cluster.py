"""The SLURM cluster that scripts/slurm-up.sh starts really runs jobs.

Without accounting (no slurmdbd) the final state and exit code of a job come from
``scontrol show job``, which keeps finished jobs for MinJobAge; the SLURM backend relies on the
same source, so this test pins down the format it parses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_service

pytestmark = pytest.mark.slurm

POLL_TIMEOUT_SECONDS = 90
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _cluster_answers() -> bool:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
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


def _submit(workdir: Path, script: str) -> str:
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--job-name=workflow-cluster-test",
            f"--chdir={workdir}",
            f"--output={workdir}/slurm-%j.out",
            "--time=00:02:00",
            f"--wrap={script}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    # --parsable prints "<jobid>" or "<jobid>;<cluster>".
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), result.stdout
    return job_id


def _job_fields(job_id: str) -> dict[str, str]:
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        timeout=15,
        check=True,
    )
    # One line of Key=Value pairs; values up to the next " Key=" (Command= etc. may hold spaces).
    return dict(re.findall(r"(\w[\w/:]*)=(.*?)(?=\s+\w[\w/:]*=|\s*$)", result.stdout.strip()))


def _wait_until_finished(job_id: str) -> dict[str, str]:
    deadline = time.monotonic() + POLL_TIMEOUT_SECONDS
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        fields = _job_fields(job_id)
        if fields.get("JobState") in TERMINAL_STATES:
            return fields
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=False, timeout=15)
    pytest.fail(
        f"job {job_id} did not finish within {POLL_TIMEOUT_SECONDS}s; last seen: "
        f"JobState={fields.get('JobState')} Reason={fields.get('Reason')}"
    )


def test_a_job_that_exits_0_completes_with_exit_code_0(slurm_cluster: None, tmp_path) -> None:
    job_id = _submit(tmp_path, "echo hello from slurm")

    fields = _wait_until_finished(job_id)

    assert fields["JobId"] == job_id
    assert fields["JobState"] == "COMPLETED"
    assert fields["ExitCode"] == "0:0"
    assert (tmp_path / f"slurm-{job_id}.out").read_text().strip() == "hello from slurm"


def test_a_job_that_exits_3_fails_with_exit_code_3(slurm_cluster: None, tmp_path) -> None:
    job_id = _submit(tmp_path, "echo about to fail; exit 3")

    fields = _wait_until_finished(job_id)

    assert fields["JobState"] == "FAILED"
    assert fields["ExitCode"] == "3:0"
    assert fields["Reason"] == "NonZeroExitCode"
    assert "about to fail" in (tmp_path / f"slurm-{job_id}.out").read_text()
