"""Named pause points for the fault-injection tests: the only test hook in production code.

A worker reaching ``pause_point("packaging.mid_tar")`` carries on at once unless the environment
says otherwise: with ``WORKFLOW_FAULT_DIR`` set and the point named in ``WORKFLOW_FAULT_PAUSE``
(comma separated), it writes ``<dir>/<name>.reached`` (pid and time) and waits until
``<dir>/<name>.release`` exists. The test sees the marker, then strikes (SIGKILL, a broker
restart, ...) knowing exactly where the worker stands. Unset, the cost is one dictionary lookup.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

# Every pause point, so the tests and the code cannot drift apart on a name.
POINTS = frozenset(
    {
        "packaging.mid_tar",
        "transfer.after_copy",
        "unpack.mid_bundle",
        # Deletion (issue 10): a claimed deletion about to lock and re-judge its copy; the
        # decision committed (DELETION_IN_PROGRESS) and the file not yet removed.
        "deletion.before_decision",
        "deletion.mid_delete",
        # Workflow runs (issue 11): a claimed run about to be submitted; the backend has
        # accepted the job but hpc_job_id is not committed; outputs hashed, not yet registered.
        "workflow.before_submit",
        "workflow.after_submit",
        "results.before_register",
        # Campaigns (issue 12): a backfill/reprocess run just created (committed), more to come.
        "campaign.after_run_created",
    }
)


def pause_point(name: str) -> None:
    if name not in POINTS:
        raise ValueError(f"unknown pause point {name!r}")
    wanted = os.environ.get("WORKFLOW_FAULT_PAUSE")
    directory = os.environ.get("WORKFLOW_FAULT_DIR")
    if not wanted or not directory or name not in wanted.split(","):
        return
    folder = Path(directory)
    marker = folder / f"{name}.reached"
    tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
    tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
    os.replace(tmp, marker)
    release = folder / f"{name}.release"
    while not release.exists():
        time.sleep(0.05)
