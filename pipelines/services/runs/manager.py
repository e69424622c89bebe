"""The workflow manager's tick: claim PENDING runs, give them a staging job, renew the leases
of runs that wait for it, and hand staged runs to one ``submit_run`` task each (the package
docstring has the whole story)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django.db import transaction
from django.db.models import Count, F, Q, QuerySet
from django.utils import timezone

from pipelines.exceptions import NonRetryableError
from pipelines.models import (
    DataLocation,
    ExecutedReductionStep,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
    RunStatus,
    StagingJob,
    Status,
)

from ..operations import ClaimLost, new_claim_token
from ..states import transition_batch

if TYPE_CHECKING:
    pass


from .common import (
    LIVE_STAGING,
    SUBMIT_MARK,
    job_name,
    run_lease_expiry,
    run_renew_leases,
    run_stages_raw_data,
    served_runs,
)
from .lifecycle import run_fail

log = logging.getLogger(__name__)


# --- the workflow manager ------------------------------------------------------------------------
def workflow_manager_tick(*, owner: str, limit: int = 200) -> dict[str, int]:
    """One tick (MANAGERS["workflow"]): claim PENDING runs, give claimed runs a staging job,
    keep waiting runs' leases alive, fail runs whose staging failed for good, and dispatch the
    submission of runs whose inputs are staged. Database work only; the I/O is in
    ``run_submit``. Returns counts: claimed, staging_created, waiting, failed, dispatched (any
    of them non-zero: the tick found work)."""
    counts = {"claimed": len(run_claim_batch(owner=owner, limit=limit))}
    counts.update(runs_advance_staging(owner=owner, limit=limit))
    if counts["staging_created"]:
        # Dispatch the new staging jobs now rather than at the staging manager's next tick;
        # their completion queues a workflow tick in turn (stage_data_task).
        from ..staging import staging_manager_tick

        staging_manager_tick(owner=owner)
    return counts


def runs_waiting_for_staging(staging_job_id: int) -> bool:
    """Whether a claimed run waits for this staging job (the staging task then queues a
    workflow tick so that run is submitted at once)."""
    return (
        ExecutedReductionStep.objects.filter(
            staging_job_id=staging_job_id, status=RunStatus.STAGING_DATA
        )
        .exclude(idempotency_key__startswith=SUBMIT_MARK)
        .exists()
    )


def run_claim_batch(*, owner: str, limit: int) -> list[int]:
    """PENDING -> STAGING_DATA for up to ``limit`` served runs, highest pipeline priority first,
    then oldest, with one new claim token and a lease, in one conditional UPDATE (two managers
    at once claim disjoint runs). Returns the ids claimed."""
    candidates = served_runs().order_by("-reduction_step__pipeline__priority", "created_at", "pk")
    with transaction.atomic():
        # Campaigns (issue 12, helper "campaigns"): at most campaign.max_active runs of one
        # backfill/reprocessing in the workflow at once; the filter locks those campaigns'
        # rows until this claim commits (services/campaigns.py: campaign_admissible_runs).
        from ..campaigns import campaign_admissible_runs

        candidates = candidates.filter(campaign_admissible_runs())
        return transition_batch(
            candidates,
            RunStatus.STAGING_DATA,
            expected=RunStatus.PENDING,
            actor=f"manager:{owner}",
            reason="claimed by the workflow manager",
            updates={
                "lease_owner": owner[:200],
                "lease_expires_at": run_lease_expiry(),
                "claim_token": new_claim_token(),
                # A fresh claim has not handed the run to a submitter yet.
                "idempotency_key": "",
            },
            marker="claim_token",
            limit=limit,
        )


def runs_advance_staging(*, owner: str, limit: int) -> dict[str, int]:
    """The staging half of the tick, for claimed runs not yet handed to a submitter."""
    counts = dict.fromkeys(("staging_created", "waiting", "failed", "dispatched"), 0)
    runs = list(
        served_runs()
        .filter(status=RunStatus.STAGING_DATA)
        .exclude(idempotency_key__startswith=SUBMIT_MARK)
        .select_related("staging_job", "reduction_step__pipeline__processing_location")
        .order_by("-reduction_step__pipeline__priority", "created_at", "pk")[:limit]
    )
    waiting: dict[str, list[int]] = {}
    actor = f"manager:{owner}"
    for run in runs:
        job = run.staging_job
        if job is not None and job.status == Status.FAILED:
            counts["failed"] += run_fail(
                run.pk,
                token=run.claim_token,
                reason=f"staging job {job.pk} failed: {job.failure_error_message or 'no reason'}",
                actor=actor,
            )
            continue
        try:
            job, created = run_staging_job_ensure(run, actor=actor)
        except NonRetryableError as exc:
            counts["failed"] += run_fail(
                run.pk, token=run.claim_token, reason=f"cannot stage: {exc}", actor=actor,
                for_good=True,
            )  # fmt: skip
            continue
        except ClaimLost:
            continue
        counts["staging_created"] += int(created)
        if job is None or job.status == Status.COMPLETED:
            counts["dispatched"] += run_dispatch_submission(run, owner=owner)
        else:
            waiting.setdefault(run.claim_token, []).append(run.pk)
    for token, ids in waiting.items():
        counts["waiting"] += run_renew_leases(ids, token=token, statuses=[RunStatus.STAGING_DATA])
    return counts


def run_staging_job_ensure(
    run: ExecutedReductionStep, *, actor: str
) -> tuple[StagingJob | None, bool]:
    """The StagingJob the run waits for, linked to the run: its own when still live and active,
    else a live active job to the same location covering all its packages, else a new one.
    Returns (job, created); (None, False) for a run without raw inputs or whose step stages
    none (``run_stages_raw_data``): nothing to stage.
    Raises ``NonRetryableError`` when a package cannot be staged (not archived) or the pipeline's
    location is not an active PROCESSING location, ``ClaimLost`` when the claim moved on."""
    from ..staging import staging_job_create

    if not run_stages_raw_data(run):
        return None, False
    package_ids = sorted(run.input_raw_packages.values_list("pk", flat=True))
    if not package_ids:
        return None, False
    destination = run.reduction_step.pipeline.processing_location
    job = run.staging_job
    if (
        job is not None
        and job.active
        and job.status in LIVE_STAGING
        and job.destination_location_id == destination.pk
    ):
        return job, False
    created = False
    job = _live_staging_job_covering(package_ids, destination) or _revived_staging_job(
        package_ids, destination
    )
    with transaction.atomic():
        if job is None:
            packages = list(run.input_raw_packages.order_by("pk"))
            job = staging_job_create(
                packages, destination=destination, actor=f"{actor} for run {run.pk}"
            )
            created = True
        # Conditional on the job this tick read: of two ticks at once, the second finds the run
        # linked already and its new job is rolled back with it.
        linked = ExecutedReductionStep.objects.filter(
            pk=run.pk,
            status=RunStatus.STAGING_DATA,
            claim_token=run.claim_token,
            staging_job_id=run.staging_job_id,
        ).update(staging_job=job, updated_at=timezone.now())
        if not linked:
            raise ClaimLost(f"run {run.pk}: claim or staging job changed while linking a job")
    return job, created


def _live_staging_job_covering(
    package_ids: list[int], destination: DataLocation
) -> StagingJob | None:
    """A live, active job to ``destination`` whose packages include all of ``package_ids``;
    completed ones first (nothing to wait for), then the newest. One query."""
    return (
        _jobs_covering(package_ids, destination)
        .filter(active=True, status__in=LIVE_STAGING)
        .order_by(F("finished_at").desc(nulls_last=True), "-created_at")
        .first()
    )


def _jobs_covering(package_ids: list[int], destination: DataLocation) -> QuerySet[StagingJob]:
    """Staging jobs to ``destination`` whose packages include every one of ``package_ids``."""
    return (
        StagingJob.objects.filter(destination_location=destination)
        .annotate(
            covered=Count(
                "raw_data_packages",
                filter=Q(raw_data_packages__in=package_ids),
                distinct=True,
            )
        )
        .filter(covered=len(package_ids))
    )


def _revived_staging_job(package_ids: list[int], destination: DataLocation) -> StagingJob | None:
    """A completed job covering ``package_ids`` that a finished run released, made active again
    when every file of those packages is still staged there (a downstream step over the same
    data, right after its upstream run finished): the run needs no new staging round trip.
    None when there is no such job or a file is gone."""
    job = (
        _jobs_covering(package_ids, destination)
        .filter(active=False, status=Status.COMPLETED)
        .order_by("-finished_at", "-pk")
        .first()
    )
    if job is None:
        return None
    files = RawDataFile.objects.filter(raw_data_package__in=package_ids).count()
    staged = (
        PhysicalCopy.objects.filter(
            raw_data_file__raw_data_package__in=package_ids,
            location=destination,
            status__in=(PhysicalCopyStatus.STAGED, PhysicalCopyStatus.PRESENT),
        )
        .values("raw_data_file_id")
        .distinct()
        .count()
    )
    if not files or staged != files:
        return None
    # Another tick may revive it at the same moment: either way it is active now.
    StagingJob.objects.filter(pk=job.pk, active=False).update(
        active=True, updated_at=timezone.now()
    )
    job.active = True
    return job


def run_dispatch_submission(run: ExecutedReductionStep, *, owner: str) -> int:
    """Hand a staged run to one ``submit_run`` task on ``workflow.hpc`` under a fresh claim token,
    after commit. Conditional on the claim the tick read, so a run handed over once is never
    handed over again under this claim. Returns 1 when dispatched."""
    from pipelines.queues import HPC_QUEUE
    from pipelines.tasks import submit_run

    token = new_claim_token()
    moved = ExecutedReductionStep.objects.filter(
        pk=run.pk, status=RunStatus.STAGING_DATA, claim_token=run.claim_token
    ).update(
        claim_token=token,
        lease_owner=owner[:200],
        lease_expires_at=run_lease_expiry(),
        idempotency_key=f"{SUBMIT_MARK}{job_name(run)}",
        updated_at=timezone.now(),
    )
    if not moved:
        return 0
    pk = run.pk

    def enqueue() -> None:
        try:
            submit_run.apply_async(args=(pk,), kwargs={"claim_token": token}, queue=HPC_QUEUE)
        except Exception:
            # The run stays claimed; its lease runs out and recovery hands it back to PENDING.
            log.exception("could not enqueue the submission of run %s", pk)

    transaction.on_commit(enqueue)
    return 1
