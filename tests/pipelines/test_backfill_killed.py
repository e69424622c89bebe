"""A backfill killed mid-way (SIGKILL of the ``manage.py backfill`` process right after it
committed a run, at the pause point ``campaign.after_run_created``) and run again resumes its
campaign: every sub-group gets exactly one run, none twice. A subprocess on its own SQLite
facility (tests/subprocesses.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.subprocesses import ROOT, clean_env, manage, python

WORLD = """
import json
from tests.pipelines.campaign_helpers import scan_package, two_step_pipeline
pipeline, calibrate, combine = two_step_pipeline()
for day in range(1, 6):
    scan_package(day)
print(json.dumps({"pipeline": pipeline.name, "calibrate": calibrate.pk}))
"""

COUNT = """
import json
from collections import Counter
from pipelines.models import Campaign, ExecutedReductionStep
pairs = Counter(ExecutedReductionStep.objects.values_list("reduction_step_id", "sub_group_key"))
print(json.dumps({"campaigns": Campaign.objects.count(), "runs": sum(pairs.values()),
                  "most": max(pairs.values(), default=0)}))
"""


def test_a_killed_backfill_run_again_creates_no_duplicate_runs(tmp_path: Path) -> None:
    var = tmp_path / "var"
    migrated = manage(var, "migrate", "--no-input", timeout=300)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    world = json.loads(python(var, WORLD).strip().splitlines()[-1])
    args = ["--pipeline", world["pipeline"], "--since", "2026-03-01", "--until", "2026-04-01",
            "--all"]  # fmt: skip
    faults = tmp_path / "faults"
    faults.mkdir()
    env = clean_env(
        var,
        WORKFLOW_FAULT_DIR=str(faults),
        WORKFLOW_FAULT_PAUSE="campaign.after_run_created",
    )
    process = subprocess.Popen(
        [sys.executable, "manage.py", "backfill", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    marker = faults / "campaign.after_run_created.reached"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the backfill never reached its pause point"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    after_kill = json.loads(python(var, COUNT).strip().splitlines()[-1])
    assert after_kill == {"campaigns": 1, "runs": 1, "most": 1}

    again = manage(var, "backfill", *args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(resumed" in again.stdout and "4 run(s) created now" in again.stdout
    final = json.loads(python(var, COUNT).strip().splitlines()[-1])
    assert final == {"campaigns": 1, "runs": 5, "most": 1}
