"""Reduction runs (ExecutedReductionStep): the workflow manager, cancel and retry.

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

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q, QuerySet
from django.utils import timezone

from pipelines.exceptions import NonRetryableError, is_retryable
from pipelines.faults import pause_point
from pipelines.models import (
    ACTIVE_RUN_STATUSES,
    CANCELLABLE_RUN_STATUSES,
    DataLocation,
    DataProduct,
    DataProductType,
    ExecutedReductionStep,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
    ReductionSoftwareVersion,
    RunStatus,
    StagingJob,
    Status,
)
from pipelines.storage.checksums import checksum_file, new_hasher
from pipelines.storage.paths import safe_join
from reduction.errors import ReductionConfigError
from reduction.instruments import get_instrument
from reduction.models import ParameterSet
from reduction.services import (
    parameter_set_script_write,
    reduction_config_current,
    reduction_config_update,
)

from .operations import ClaimLost, new_claim_token
from .states import ForbiddenTransition, TransitionConflict, transition, transition_batch

if TYPE_CHECKING:
    from pipelines.containers import RunLayout

log = logging.getLogger(__name__)
alerts = logging.getLogger("pipelines.alerts")

_CLEAR_LEASE: dict[str, Any] = {"lease_owner": "", "lease_expires_at": None, "claim_token": ""}
_MESSAGE_LIMIT = 5000
# Staging jobs a run may wait for or reuse: not failed, and still protecting their copies.
LIVE_STAGING = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS, Status.COMPLETED)
# A run that still needs its staged inputs: active, or failed and awaiting its retry.
_NEEDS_INPUTS = Q(status__in=ACTIVE_RUN_STATUSES) | Q(
    status=RunStatus.FAILED, failed_for_good=False
)
SUBMIT_MARK = "submit:"
DEFAULT_RESOURCES = {"cpu": 1, "memory_gb": 1, "time_hours": 1}


class RunConflict(TransitionConflict):
    """The operator's move does not apply to the run as it is (a cancel of a run that is not
    pending, submitted or running; a retry of a run that has not failed, or whose sub-group
    another run occupies). Nothing was changed. The API answers it with HTTP 409."""


class CorruptInput(NonRetryableError):
    """A staged input (or an upstream product) does not match its registered checksum: the run
    must not run on it, and running it again will not help until the copy is repaired."""


# --- reduction script ----------------------------------------------------------------------------
def reduction_script_for_run(run: ExecutedReductionStep, config_dir: Path) -> ParameterSet:
    """Pin the parameter set a run uses and put its script in the run's config directory.

    The run keeps the version it was first given (a retry runs the same script); a new run gets
    the instrument's latest version, created from the current values if the instrument has never
    been saved. The script is written byte for byte as stored with the version (atomically, as
    ``reduce_<KEY>.py``) after checking its checksum. Raises ReductionConfigError when the step
    names no instrument or the stored script does not match its checksum.
    """
    key = run.reduction_step.reduction_instrument
    if not key:
        raise ReductionConfigError(f"{run.reduction_step} does not name a reduction instrument")
    # An unknown instrument (UnknownInstrument) is refused before any version is pinned.
    get_instrument(key)
    parameter_set = run.parameter_set
    if parameter_set is None:
        parameter_set = ParameterSet.objects.latest_for(key)
        if parameter_set is None:
            parameter_set = reduction_config_update(
                key,
                values=reduction_config_current(key),
                user=None,
                comment=f"first version, created for run {run.pk}",
            ).parameter_set
        # Conditional: if another worker pinned a version first, use that one.
        pinned = ExecutedReductionStep.objects.filter(pk=run.pk, parameter_set__isnull=True).update(
            parameter_set=parameter_set
        )
        if not pinned:
            run.refresh_from_db(fields=["parameter_set"])
            assert run.parameter_set is not None
            parameter_set = run.parameter_set
        run.parameter_set = parameter_set
    parameter_set_script_write(parameter_set, config_dir)
    return parameter_set


# --- which runs this instance serves -------------------------------------------------------------
def served_runs() -> QuerySet[ExecutedReductionStep]:
    """Runs of the pipelines this instance serves: those of the processing location
    ``triggers.processing_location_id()`` names, every pipeline's when it names none (the
    embedded facility serves all of its processing sites). The three managers agree on it."""
    from .triggers import processing_location_id

    runs = ExecutedReductionStep.objects.all()
    location_id = processing_location_id()
    if location_id:
        runs = runs.filter(reduction_step__pipeline__processing_location_id=location_id)
    return runs


def job_name(run: ExecutedReductionStep) -> str:
    """The backend job name of the run's current attempt; backends find a job by it."""
    return f"run-{run.pk}-{run.attempt}"


def run_lease_expiry(seconds: int | None = None) -> Any:
    return timezone.now() + timedelta(seconds=seconds or settings.WORKFLOW_LEASE_SECONDS)


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
        from .staging import staging_manager_tick

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
        from .campaigns import campaign_admissible_runs

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
    Returns (job, created); (None, False) for a run without raw inputs (nothing to stage).
    Raises ``NonRetryableError`` when a package cannot be staged (not archived) or the pipeline's
    location is not an active PROCESSING location, ``ClaimLost`` when the claim moved on."""
    from .staging import staging_job_create

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
        StagingJob.objects.filter(
            destination_location=destination, active=True, status__in=LIVE_STAGING
        )
        .annotate(
            covered=Count(
                "raw_data_packages",
                filter=Q(raw_data_packages__in=package_ids),
                distinct=True,
            )
        )
        .filter(covered=len(package_ids))
        .order_by(F("finished_at").desc(nulls_last=True), "-created_at")
        .first()
    )


def _revived_staging_job(package_ids: list[int], destination: DataLocation) -> StagingJob | None:
    """A completed job covering ``package_ids`` that a finished run released, made active again
    when every file of those packages is still staged there (a downstream step over the same
    data, right after its upstream run finished): the run needs no new staging round trip.
    None when there is no such job or a file is gone."""
    job = (
        StagingJob.objects.filter(
            destination_location=destination, active=False, status=Status.COMPLETED
        )
        .annotate(
            covered=Count(
                "raw_data_packages",
                filter=Q(raw_data_packages__in=package_ids),
                distinct=True,
            )
        )
        .filter(covered=len(package_ids))
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


def run_renew_leases(
    ids: list[int], *, token: str, statuses: list[str], seconds: int | None = None
) -> int:
    """Push the lease of the runs among ``ids`` still held by ``token`` in one of ``statuses``.
    Not a state move (no event). Returns how many were renewed."""
    if not token or not ids:
        return 0
    return ExecutedReductionStep.objects.filter(
        pk__in=ids, claim_token=token, status__in=statuses
    ).update(lease_expires_at=run_lease_expiry(seconds), updated_at=timezone.now())


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


# --- the submission worker -----------------------------------------------------------------------
@dataclass(frozen=True)
class StagedInput:
    """One raw file of the run's packages, linked into the attempt's input directory."""

    package_id: int
    package_name: str
    raw_file_id: str
    relative_path: str
    checksum: str
    checksum_algorithm: str
    size: int
    instrument: str
    module: str


class RunLeaseKeeper:
    """Renews a claimed run's lease from a background thread while its worker does I/O, every
    third of the lease period; ``check()`` raises ``ClaimLost`` once a renewal finds the claim
    gone (the run was recovered and claimed again), so the worker stops instead of racing."""

    def __init__(self, pk: int, *, token: str, status: str, seconds: int | None = None) -> None:
        self.pk = pk
        self.token = token
        self.status = status
        self.seconds = seconds or settings.WORKFLOW_LEASE_SECONDS
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-run-{pk}", daemon=True)

    def __enter__(self) -> RunLeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.seconds)

    def check(self) -> None:
        if self.lost.is_set():
            raise ClaimLost(f"run {self.pk}: lease lost during the work; stopping")

    def _run(self) -> None:
        from django.db import connection

        try:
            while not self._stop.wait(max(self.seconds / 3, 0.2)):
                try:
                    held = run_renew_leases(
                        [self.pk], token=self.token, statuses=[self.status], seconds=self.seconds
                    )
                except Exception:
                    log.warning("lease renewal of run %s failed", self.pk, exc_info=True)
                    connection.close()
                    continue
                if not held:
                    self.lost.set()
                    return
        finally:
            connection.close()


def run_submit(run_id: int, *, token: str, owner: str) -> ExecutedReductionStep:
    """Prepare and submit one staged run held by ``token`` (module docstring, step 3). Returns
    the run, SUBMITTED. Raises ``ClaimLost`` when the claim no longer holds the run (nothing
    done), ``CorruptInput`` for an input that does not match its checksum (nothing submitted),
    and whatever preparing or submitting raised otherwise; the task fails the run then."""
    from pipelines.backends.base import JobSpec, get_backend
    from pipelines.containers import build_command, make_run_dirs, run_layout, write_manifest

    run = ExecutedReductionStep.objects.select_related(
        "reduction_step__pipeline__processing_location", "software_version__software"
    ).get(pk=run_id)
    if run.status != RunStatus.STAGING_DATA or not token or run.claim_token != token:
        raise ClaimLost(
            f"run {run_id} is {run.status} under claim {run.claim_token[:8] or '-'}, "
            f"not staging_data under {token[:8] or '-'}"
        )
    step = run.reduction_step
    pipeline = step.pipeline
    location = pipeline.processing_location
    if location.storage_type != DataLocation.StorageType.DISK or not location.root_path:
        raise NonRetryableError(
            f"processing location {location} is not a disk location with a root path; runs "
            "need a file system to run in"
        )
    version = run_software_version(run)
    if not version.command:
        raise NonRetryableError(f"software version {version} has no command to run")
    backend = get_backend()
    with RunLeaseKeeper(run.pk, token=token, status=RunStatus.STAGING_DATA) as keeper:
        layout = run_layout(Path(location.root_path), pipeline.pk, run.sub_group_key, run.pk,
                            run.attempt)  # fmt: skip
        make_run_dirs(layout, step_name=step.name)
        final_step = not step.downstream_steps.exists()
        command, env = build_command(
            runtime=settings.CONTAINER_RUNTIME,
            image=version.image_ref,
            sif_path=version.sif_path,
            argv=[str(a) for a in version.command],
            layout=layout,
            step_name=step.name,
            final_step=final_step,
        )
        inputs = _link_staged_inputs(run, location, layout, keeper)
        products = _copy_upstream_products(run, layout, keeper)
        script = None
        if step.reduction_instrument:
            parameter_set = reduction_script_for_run(run, layout.config)
            script = {
                "instrument": parameter_set.instrument,
                "version": parameter_set.number,
                "path": _container_path(env, "WORKFLOW_CONFIG_DIR", layout.config,
                                        get_instrument(parameter_set.instrument).script_name),
                "checksum": parameter_set.script_checksum,
            }  # fmt: skip
        manifest = _manifest(run, version, env, inputs, products, script, final_step)
        write_manifest(layout, manifest)
        keeper.check()
        env = {
            **env,
            "WORKFLOW_RUN_ID": str(run.pk),
            "WORKFLOW_STEP_NAME": step.name,
            # The job pushes its end to run_job_finished, so the run is collected at once.
            **_completion_push_env(run.pk),
        }
        spec = JobSpec(
            name=job_name(run),
            command=command,
            run_dir=layout.run_dir,
            env=env,
            resources={**DEFAULT_RESOURCES, **(step.resource_requirements or {})},
        )
        pause_point("workflow.before_submit")
        job_id = backend.submit(spec)
        pause_point("workflow.after_submit")
    now = timezone.now()
    try:
        return transition(
            run,
            RunStatus.SUBMITTED,
            actor=f"worker:{owner}",
            reason=f"submitted to {backend.name} as {job_id}",
            where={"claim_token": token},
            updates={
                **_CLEAR_LEASE,
                "hpc_job_id": job_id[:100],
                "submitted_at": now,
                "run_dir": str(layout.run_dir),
                "workspace_dir": str(layout.workspace),
                "log_path": str(layout.logs),
                "idempotency_key": spec.name,
            },
        )
    except TransitionConflict as exc:
        # The job exists under its name; whoever holds the run now finds it there.
        raise ClaimLost(f"run {run.pk}: claim lost after submitting {job_id} ({exc})") from exc


def _completion_push_env(run_id: int) -> dict[str, str]:
    """The environment that makes the job push its end (``job_done_callback_env``), except on
    kombu's file-system broker: its reader moves a message file away while a writer in another
    process may still be writing it, and a half-written message stops the consuming worker
    (JSONDecodeError in the transport). The embedded facility that uses that broker ticks the
    result manager every round, so its runs are collected by polling instead."""
    from pipelines.backends.base import job_done_callback_env

    if str(settings.CELERY_BROKER_URL).startswith("filesystem://"):
        return {}
    return job_done_callback_env(run_id)


def run_software_version(run: ExecutedReductionStep) -> ReductionSoftwareVersion:
    """The version the run was created with; else the step's version; else the newest active
    version of the step's software. Raises ``NonRetryableError`` when there is none."""
    if run.software_version is not None:
        return run.software_version
    step = run.reduction_step
    version = step.software_version or (
        ReductionSoftwareVersion.objects.filter(software=step.software, is_active=True)
        .order_by("-created_at")
        .first()
    )
    if version is None:
        raise NonRetryableError(f"{step.software} has no active version to run {step}")
    return version


def _container_path(env: dict[str, str], key: str, host_dir: Path, *parts: str) -> str:
    """Where the job sees ``host_dir/parts``: under the directory ``env[key]`` names (the
    container's mount point, or the host path itself with runtime ``none``)."""
    base = env.get(key) or str(host_dir)
    return str(Path(base, *parts))


def _link_staged_inputs(
    run: ExecutedReductionStep,
    location: DataLocation,
    layout: RunLayout,
    keeper: RunLeaseKeeper,
) -> list[StagedInput]:
    """Put every raw file of the run's packages into ``layout.input`` (a hard link to the staged
    copy, a copy where links are impossible) and verify the bytes there against the file's
    registered checksum. A mismatch or a missing staged copy marks the copy MISMATCH/MISSING
    (the integrity manager repairs it) and raises ``CorruptInput``: nothing runs on bad data."""
    staged = {
        c.raw_data_file_id: c
        for c in PhysicalCopy.objects.filter(
            raw_data_file__raw_data_package__in=run.input_raw_packages.all(),
            location=location,
            status__in=(PhysicalCopyStatus.STAGED, PhysicalCopyStatus.PRESENT),
        )
    }
    files = (
        RawDataFile.objects.filter(raw_data_package__in=run.input_raw_packages.all())
        .select_related("raw_data_package", "instrument_module__instrument")
        .order_by("raw_data_package_id", "relative_path")
    )
    inputs: list[StagedInput] = []
    for raw_file in files:
        keeper.check()
        package = raw_file.raw_data_package
        assert package is not None
        copy = staged.get(raw_file.pk)
        if copy is None:
            raise CorruptInput(
                f"raw file {raw_file.relative_path} of {package.name} is not staged at {location}"
            )
        source = safe_join(location.root_path, copy.relative_path)
        target = safe_join(str(layout.input), raw_file.relative_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(source, target)
            except FileNotFoundError:
                _mark_copy(copy, PhysicalCopy.Integrity.MISSING, run)
                raise CorruptInput(
                    f"staged input {copy.relative_path} of {package.name} is missing from "
                    f"{location}"
                ) from None
            except OSError:
                shutil.copyfile(source, target)
        digest = checksum_file(target, raw_file.checksum_algorithm)
        if digest != raw_file.checksum:
            _mark_copy(copy, PhysicalCopy.Integrity.MISMATCH, run)
            with contextlib.suppress(OSError):
                target.unlink()
            raise CorruptInput(
                f"staged input {copy.relative_path} of {package.name} at {location} hashes to "
                f"{digest[:16]}..., registered {raw_file.checksum[:16]}...; not run on it"
            )
        inputs.append(
            StagedInput(
                package_id=package.pk,
                package_name=package.name,
                raw_file_id=str(raw_file.pk),
                relative_path=raw_file.relative_path,
                checksum=raw_file.checksum,
                checksum_algorithm=raw_file.checksum_algorithm,
                size=raw_file.size,
                instrument=raw_file.instrument_module.instrument.name,
                module=raw_file.instrument_module.name,
            )
        )
    return inputs


def _mark_copy(copy: PhysicalCopy, integrity: str, run: ExecutedReductionStep) -> None:
    with contextlib.suppress(ForbiddenTransition, TransitionConflict):
        transition(
            copy,
            integrity,
            field="integrity",
            actor=f"run:{run.pk}",
            reason=f"found {integrity} when run {run.pk} verified its inputs",
        )


def _copy_upstream_products(
    run: ExecutedReductionStep, layout: RunLayout, keeper: RunLeaseKeeper
) -> list[tuple[DataProduct, str]]:
    """Copy each upstream product into ``input/products/<its step>/<its run>/<its path>``
    (read-only in the job, like the raw inputs; the manifest's ``upstream_products``),
    verifying the bytes against the product's checksum while they are copied. Returns
    (product, path relative to ``input/``)."""
    copied: list[tuple[DataProduct, str]] = []
    products = run.input_products.select_related("produced_by__reduction_step").order_by("pk")
    for product in products:
        keeper.check()
        upstream = product.produced_by
        source = Path(upstream.run_dir) / product.relative_path
        relative = (
            f"products/{upstream.reduction_step.name}/{upstream.pk}/{_product_subpath(product)}"
        )
        target = safe_join(str(layout.input), relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher = new_hasher(product.checksum_algorithm)
        try:
            with open(source, "rb") as reader, open(target, "wb") as writer:
                for chunk in iter(lambda: reader.read(1 << 20), b""):
                    hasher.update(chunk)
                    writer.write(chunk)
        except FileNotFoundError:
            raise CorruptInput(
                f"upstream product {product.pk} ({product.relative_path} of run {upstream.pk}) "
                f"is missing at {source}"
            ) from None
        if hasher.hexdigest() != product.checksum:
            raise CorruptInput(
                f"upstream product {product.pk} ({product.relative_path} of run {upstream.pk}) "
                "does not match its checksum; not run on it"
            )
        copied.append((product, relative))
    return copied


def _product_subpath(product: DataProduct) -> str:
    """The product's path below its producer's output directory: ``output/science/x`` ->
    ``science/x``; ``workspace/calibrate/x`` -> ``x``."""
    parts = Path(product.relative_path).parts
    if parts and parts[0] == "output":
        return str(Path(*parts[1:]))
    if len(parts) > 2 and parts[0] == "workspace":
        return str(Path(*parts[2:]))
    return product.relative_path


def _manifest(
    run: ExecutedReductionStep,
    version: ReductionSoftwareVersion,
    env: dict[str, str],
    inputs: list[StagedInput],
    products: list[tuple[DataProduct, str]],
    script: dict[str, Any] | None,
    final_step: bool,
) -> dict[str, Any]:
    """``manifest.json`` (schema 1 of ``pipelines.containers.write_manifest``): the step's
    parameters, the staged inputs and upstream products with their checksums (paths relative to
    ``input/``), what was left out and why, and the pinned reduction script."""
    step = run.reduction_step
    parameters = run.config_snapshot or (step.config.parameters if step.config else {})
    return {
        "run_id": run.pk,
        "attempt": run.attempt,
        "job_name": job_name(run),
        "pipeline_id": step.pipeline_id,
        "pipeline": step.pipeline.name,
        "step": step.name,
        "is_final_step": final_step,
        "sub_group_key": run.sub_group_key,
        "sub_group_values": run.sub_group_values,
        "software": version.software.name,
        "version": version.version,
        "image": version.image_ref,
        "parameters": parameters,
        "output_dir": env.get("WORKFLOW_OUTPUT_DIR", ""),
        "raw_data_package_ids": sorted({i.package_id for i in inputs}),
        "inputs": [
            {
                "path": i.relative_path,
                "checksum": i.checksum,
                "checksum_algorithm": i.checksum_algorithm,
                "size": i.size,
                "raw_data_file_id": i.raw_file_id,
                "raw_data_package_id": i.package_id,
                "package": i.package_name,
                "instrument": i.instrument,
                "module": i.module,
            }
            for i in inputs
        ],
        "upstream_products": [
            {
                "path": relative,
                "checksum": product.checksum,
                "checksum_algorithm": product.checksum_algorithm,
                "size": product.size_bytes,
                "product_id": product.pk,
                "product_type": DataProductType(product.product_type).name,
                "filename": product.filename,
                "step": product.produced_by.reduction_step.name,
                "run_id": product.produced_by_id,
            }
            for product, relative in products
        ],
        "excluded_inputs": run.excluded_inputs,
        "reduction_script": script,
    }


# --- failing, retrying, releasing ----------------------------------------------------------------
def run_fail(
    run_id: int,
    *,
    token: str | None,
    reason: str,
    actor: str,
    for_good: bool = False,
    updates: dict[str, Any] | None = None,
    where: dict[str, Any] | None = None,
) -> int:
    """Fail the run's current attempt: FAILED with ``reason``, the lease cleared, and
    ``failed_for_good`` set in the same UPDATE when ``for_good`` or no retry is left (until then
    the failed run keeps its sub-group and the result manager retries it). ``token``, when
    given, must still hold the run, and so must the lookups in ``where`` (the job id a poll
    read). ``updates`` are written in the same UPDATE (exit code, metrics). Returns 1 when the
    run moved, 0 when it had moved on (a late
    report changes nothing)."""
    run = ExecutedReductionStep.objects.filter(pk=run_id).first()
    if run is None or RunStatus.FAILED not in _allowed(run.status):
        return 0
    reason = reason[:_MESSAGE_LIMIT]
    where = {**(where or {}), **({"claim_token": token} if token else {})}
    for_good = for_good or run.retry_count >= run.max_retries
    attempts = [
        *run.attempts,
        attempt_entry(run, outcome="failed", reason=reason, **(updates or {})),
    ]
    try:
        with transaction.atomic():
            transition(
                run,
                RunStatus.FAILED,
                actor=actor,
                reason=reason,
                where=where,
                updates={
                    **_CLEAR_LEASE,
                    **(updates or {}),
                    "failure_reason": reason,
                    "failed_for_good": for_good,
                    "finished_at": timezone.now(),
                    "attempts": attempts,
                },
            )
            if for_good:
                run_release_staging(run)
    except TransitionConflict as exc:
        log.info("failure of run %s not recorded: %s", run_id, exc)
        return 0
    if for_good:
        alerts.error(
            "run %s (%s, %s) failed for good after %d attempt(s): %s",
            run.pk, run.reduction_step_id, run.sub_group_key, run.attempt, reason,
        )  # fmt: skip
    return 1


def run_fail_for_exception(run_id: int, exc: BaseException, *, token: str, actor: str) -> int:
    """The submission and collection tasks' failure path: transient errors (``is_retryable``)
    and backend errors use a retry; errors that would fail the same way again (a defect,
    ``NonRetryableError``, a corrupted input, a bad reduction configuration) fail the run for
    good, with the error as its reason."""
    from pipelines.backends.base import BackendError

    text = str(exc) or exc.__class__.__name__
    retryable = is_retryable(exc) or isinstance(exc, BackendError)
    return run_fail(
        run_id,
        token=token,
        reason=f"{exc.__class__.__name__}: {text}",
        actor=actor,
        for_good=not retryable,
    )


def _allowed(status: str) -> set[str]:
    return ExecutedReductionStep.TRANSITIONS["status"].get(status, set())


def attempt_entry(run: ExecutedReductionStep, *, outcome: str, **values: Any) -> dict[str, Any]:
    """One line of ``run.attempts``: the attempt, its job, when, how it ended."""
    entry: dict[str, Any] = {
        "attempt": run.attempt,
        "job_id": run.hpc_job_id,
        "run_dir": run.run_dir,
        "submitted_at": run.submitted_at.isoformat() if run.submitted_at else None,
        "ended_at": timezone.now().isoformat(),
        "outcome": outcome,
    }
    for key, value in values.items():
        if isinstance(value, str | int | float | bool) or value is None:
            entry[key] = value
    return entry


def run_retry_due(*, actor: str, limit: int = 500) -> int:
    """The automatic retry (result manager): FAILED runs with a retry left go back to PENDING
    with ``retry_count`` one higher, so the next attempt gets its own directory and job name.
    Returns how many moved."""
    runs = list(
        served_runs()
        .filter(status=RunStatus.FAILED, failed_for_good=False, retry_count__lt=F("max_retries"))
        .order_by("updated_at")[:limit]
    )
    moved = 0
    for run in runs:
        try:
            _back_to_pending(run, actor=actor, reason=f"retry {run.retry_count + 1} of "
                             f"{run.max_retries}: {run.failure_reason[:200]}")  # fmt: skip
        except (TransitionConflict, IntegrityError) as exc:
            log.info("retry of run %s not applied: %s", run.pk, exc)
            continue
        moved += 1
    return moved


def _back_to_pending(
    run: ExecutedReductionStep, *, actor: str, reason: str, updates: dict[str, Any] | None = None
) -> ExecutedReductionStep:
    # The next attempt waits for the same staging job while it is live; a failed or released
    # one is replaced when the run is claimed again.
    job = run.staging_job
    keep = job is not None and job.active and job.status in LIVE_STAGING
    return transition(
        run,
        RunStatus.PENDING,
        actor=actor,
        reason=reason,
        expected=RunStatus.FAILED,
        where={"failed_for_good": run.failed_for_good, "retry_count": run.retry_count},
        updates={
            **_CLEAR_LEASE,
            "retry_count": F("retry_count") + 1,
            "failed_for_good": False,
            "hpc_job_id": "",
            "idempotency_key": "",
            "submitted_at": None,
            "started_at": None,
            "finished_at": None,
            "exit_code": None,
            "run_dir": "",
            "staging_job": job if keep else None,
            **(updates or {}),
        },
    )


def run_release_staging(run: ExecutedReductionStep) -> bool:
    """Let the run's StagingJob go (``active=False``: its copies are no longer protected from
    deletion) unless another run that still needs inputs uses it. Returns True when released."""
    if run.staging_job_id is None:
        return False
    others = (
        ExecutedReductionStep.objects.filter(_NEEDS_INPUTS, staging_job_id=run.staging_job_id)
        .exclude(pk=run.pk)
        .exists()
    )
    if others:
        return False
    return bool(
        StagingJob.objects.filter(pk=run.staging_job_id, active=True).update(
            active=False, updated_at=timezone.now()
        )
    )


# --- operator moves: cancel and retry ------------------------------------------------------------
def run_cancel(
    run: ExecutedReductionStep, *, actor: str, reason: str = ""
) -> ExecutedReductionStep:
    """Cancel a PENDING, SUBMITTED or RUNNING run: CANCELLED (terminal), then, when it has an
    HPC job, ``backend.cancel(job)`` exactly once, best effort (a backend error is logged and
    recorded in ``failure_reason``; the run stays CANCELLED). Its staging job is released.

    Raises ``RunConflict`` (nothing changed) for any other state, or when the run moved while
    this ran (the result manager saw the job finish first)."""
    run.refresh_from_db()
    if run.status not in CANCELLABLE_RUN_STATUSES:
        raise RunConflict(
            f"run {run.pk} is {run.get_status_display().lower()}; only pending, submitted or "
            "running runs can be cancelled"
        )
    try:
        with transaction.atomic():
            transition(
                run,
                RunStatus.CANCELLED,
                actor=actor,
                reason=reason or "cancelled",
                expected=run.status,
                updates={**_CLEAR_LEASE, "finished_at": timezone.now()},
            )
            run_release_staging(run)
    except TransitionConflict as exc:
        raise RunConflict(f"run {run.pk} changed while being cancelled: {exc}") from exc
    if run.hpc_job_id:
        from pipelines.backends.base import get_backend

        try:
            get_backend().cancel(run.hpc_job_id)
        except Exception as exc:
            note = f"cancelled; the backend could not cancel job {run.hpc_job_id}: {exc}"
            log.warning("run %s: %s", run.pk, note)
            ExecutedReductionStep.objects.filter(pk=run.pk).update(failure_reason=note[:5000])
            run.failure_reason = note
    return run


def run_retry(run: ExecutedReductionStep, *, actor: str, reason: str = "") -> ExecutedReductionStep:
    """An operator's retry of a FAILED run: back to PENDING for its next attempt, with
    ``failed_for_good`` cleared and the step's retry budget granted again from there.

    Raises ``RunConflict`` (nothing changed) when the run is not FAILED, or when its sub-group is
    occupied by another run (the trigger manager created one after this run failed for good)."""
    run.refresh_from_db()
    if run.status != RunStatus.FAILED:
        raise RunConflict(
            f"run {run.pk} is {run.get_status_display().lower()}; only failed runs can be retried"
        )
    occupant = (
        ExecutedReductionStep.objects.filter(
            Q(status__in=ACTIVE_RUN_STATUSES) | Q(status=RunStatus.FAILED, failed_for_good=False),
            reduction_step_id=run.reduction_step_id,
            sub_group_key=run.sub_group_key,
        )
        .exclude(pk=run.pk)
        .values_list("pk", flat=True)
        .first()
    )
    if occupant is not None:
        raise RunConflict(
            f"run {run.pk} cannot be retried: run {occupant} already occupies sub-group "
            f"{run.sub_group_key!r} of {run.reduction_step}"
        )
    budget = run.retry_count + 1 + run.reduction_step.max_retries
    try:
        return _back_to_pending(
            run,
            actor=actor,
            reason=reason or "manual retry",
            updates={"max_retries": budget, "triggered_by": run.triggered_by},
        )
    except IntegrityError as exc:
        raise RunConflict(
            f"run {run.pk} cannot be retried: its sub-group {run.sub_group_key!r} is occupied"
        ) from exc
    except TransitionConflict as exc:
        raise RunConflict(f"run {run.pk} changed while being retried: {exc}") from exc
