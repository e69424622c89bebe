"""Reduction runs (ExecutedReductionStep): the workflow manager, cancel and retry.

A package by topic: ``manager`` (the tick: claim, stage, hand over), ``submission`` (the
worker that prepares and submits an attempt), ``lifecycle`` (failing, the automatic retry,
releasing the staging job, cancel and retry) and ``common`` (what they share).

The workflow manager (``workflow_manager_tick``, MANAGERS["workflow"]) takes a run from PENDING
to SUBMITTED in three moves, none of which blocks a worker while data is staged:

1. **Claim.** PENDING runs of this processing location are moved to STAGING_DATA in one
   conditional UPDATE (``run_claim_batch``) with a claim token and a lease, highest pipeline
   priority first, then oldest.
2. **Stage.** Each claimed run gets a StagingJob for its raw packages at the pipeline's
   processing location: a live job that already covers them is reused, else one is created
   (``run_staging_job_ensure``). While the job is pending or in progress the tick renews the
   run's lease, so the lease reconciler (``services.recovery._recover_run``) never sends a
   waiting run back; the lease only runs out when no manager ticks at all. A job that failed
   for good fails the run (which then retries like any failed attempt).
3. **Submit.** Once the job has completed the tick hands the run to one ``submit_run`` task
   (queue ``workflow.hpc``) under a fresh claim token, marking the hand-over in
   ``idempotency_key`` (``submit:run-<id>-<attempt>``) so that later ticks neither renew nor
   re-dispatch it; the worker holds the lease from then on. The worker (``run_submit``) makes
   the attempt's directories, links the staged inputs into ``input/`` and verifies every one
   against its registered checksum (a corrupted input fails the run without running it), copies
   the upstream products into ``workspace/<upstream step>/`` verifying them too, pins the
   instrument's reduction script where the step names one, writes ``config/manifest.json``,
   builds the command for ``CONTAINER_RUNTIME`` and submits it to ``HPC_BACKEND`` under the job
   name ``run-<id>-<attempt>``. Backends look that name up before starting anything, so a worker
   killed after the backend accepted the job but before ``hpc_job_id`` was committed leaves one
   job: the run's lease expires, recovery hands it back to PENDING, and the next claim's submit
   finds the job by name. The run moves to SUBMITTED with ``hpc_job_id`` in the same UPDATE.

The result manager (``services.results``) takes it from there. ``run_cancel`` and ``run_retry``
are the operator's moves (admin actions now, UI and API later).
"""

from __future__ import annotations

from .common import (
    DEFAULT_RESOURCES,
    LIVE_STAGING,
    SUBMIT_MARK,
    CorruptInput,
    RunConflict,
    RunLeaseKeeper,
    attempt_entry,
    job_name,
    run_lease_expiry,
    run_renew_leases,
    run_stages_raw_data,
    served_runs,
)
from .lifecycle import (
    run_cancel,
    run_fail,
    run_fail_for_exception,
    run_release_staging,
    run_retry,
    run_retry_due,
)
from .manager import (
    run_claim_batch,
    run_dispatch_submission,
    run_staging_job_ensure,
    runs_advance_staging,
    runs_waiting_for_staging,
    workflow_manager_tick,
)
from .submission import (
    StagedInput,
    reduction_script_for_run,
    run_software_version,
    run_submit,
)

__all__ = [
    "DEFAULT_RESOURCES",
    "LIVE_STAGING",
    "SUBMIT_MARK",
    "CorruptInput",
    "RunConflict",
    "RunLeaseKeeper",
    "StagedInput",
    "attempt_entry",
    "job_name",
    "reduction_script_for_run",
    "run_cancel",
    "run_claim_batch",
    "run_dispatch_submission",
    "run_fail",
    "run_fail_for_exception",
    "run_lease_expiry",
    "run_release_staging",
    "run_renew_leases",
    "run_retry",
    "run_retry_due",
    "run_software_version",
    "run_stages_raw_data",
    "run_staging_job_ensure",
    "run_submit",
    "runs_advance_staging",
    "runs_waiting_for_staging",
    "served_runs",
    "workflow_manager_tick",
]
