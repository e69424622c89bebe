""" "Why is this where it is?": one sentence per object, from its state, lease and events.

``manage.py why`` and the admin change pages call ``explain()``. The sentences are read-only
views of the database: nothing here changes a row. Explainers are a literal registry, model ->
function; the deletion rules and the trigger rules come from their own services
(``deletion.copy_deletion_blocker``, ``triggers.explain_step``) so a sentence never disagrees
with what the manager will do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F
from django.utils import timezone

from pipelines.models import (
    Campaign,
    CopyRepair,
    DataProduct,
    DataTransfer,
    DataTransferPackage,
    DeletionTask,
    ExecutedReductionStep,
    LongTermArchiveTransfer,
    Operation,
    PackageState,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
    RawDataPackage,
    ReductionStep,
    RunStatus,
    StagingJob,
    StateEvent,
    Status,
)

# How many of an object's latest events ``explain`` returns.
EVENT_LIMIT = 10


class WhyError(ValueError):
    """The object named does not exist or cannot be explained; the message says which."""


@dataclass
class Explanation:
    title: str
    states: dict[str, str]
    sentence: str
    events: list[StateEvent] = field(default_factory=list)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")


def _ago(moment: datetime, now: datetime) -> str:
    seconds = int((now - moment).total_seconds())
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def operation_sentence(
    row: Operation | ExecutedReductionStep,
    *,
    manager: str,
    field_name: str = "status",
    now: datetime | None = None,
) -> str:
    """What an operation row waits for, from its status, lease and retries. ``manager`` names
    the manager that claims it (``packaging``...); ``field_name`` the phase (``unpack_status``)."""
    now = now or timezone.now()
    status = getattr(row, field_name)
    phase = getattr(type(row), "PHASES", {}).get(field_name)
    retries = getattr(row, phase.retry_field) if phase else row.retry_count
    error = getattr(row, phase.error_field, "") if phase else ""
    if status == Status.PENDING:
        interval = settings.WORKFLOW_MANAGER_INTERVAL
        if retries:
            return (
                f"waits for the {manager} manager to try again (try {retries + 1} of "
                f"{row.max_retries + 1}) after: {error or 'a retryable error'}"
            )
        return f"waits for the {manager} manager, which looks for work every {interval} s"
    if status in (Status.SCHEDULED, Status.IN_PROGRESS):
        lease = row.lease_expires_at
        doing = "queued for a worker" if status == Status.SCHEDULED else "being worked on"
        who = f" by {row.lease_owner}" if row.lease_owner else ""
        if lease is not None and lease < now:
            return (
                f"{doing}{who}, but the lease expired {_ago(lease, now)}: the lease reconciler "
                f"will hand it back within {settings.WORKFLOW_RECOVERY_INTERVAL} s"
            )
        return f"{doing}{who}; lease until {_when(lease)}"
    if status == Status.FAILED:
        return (
            f"failed for good after {retries} retries: {error or 'no message'}; an operator can "
            "reset it in the admin"
        )
    return "done"


def _package_sentence(package: RawDataPackage, now: datetime) -> str:
    if package.status != Status.COMPLETED:
        building = operation_sentence(package, manager="packaging", now=now)
        return f"the package tar is not built yet: {building}"
    if package.state == PackageState.WAITING:
        if package.data_transfer_package_id is None:
            return "built; waits for the bundling manager to put it into a transfer bundle"
        return "built and bundled; waits for its bundle to be sent"
    if package.state == PackageState.TRANSFERRING:
        transfer = (
            DataTransfer.objects.filter(data_transfer_package_id=package.data_transfer_package_id)
            .select_related("destination_location__site")
            .order_by("-created_at")
            .first()
        )
        if transfer is None:
            return "transferring: its bundle has no transfer yet (the transfer manager plans it)"
        if transfer.status != Status.COMPLETED:
            return (
                f"transferring to {transfer.destination_location}: "
                f"{operation_sentence(transfer, manager='transfer', now=now)}"
            )
        return (
            f"arrived at {transfer.destination_location}; unpacking "
            f"{operation_sentence(transfer, manager='unpack', field_name='unpack_status', now=now)}"
        )
    if package.state == PackageState.FAILED:
        return (
            f"failed: {package.failure_error_message or 'see its transfers'}; an operator can "
            "reset the package state in the admin"
        )
    archives = sorted(
        str(copy.location)
        for copy in package.physical_copies.filter(
            location__location_type="long_term_archive",
            status=PhysicalCopyStatus.PRESENT,
            integrity=PhysicalCopy.Integrity.VERIFIED,
        ).select_related("location__site")
    )
    where = ", ".join(archives) or "no verified archive copy right now"
    return f"archived {_when(package.archived_at)}; verified archive copies: {where}"


def explain_package(package: RawDataPackage, now: datetime) -> Explanation:
    return Explanation(
        title=f"raw data package {package.name} (id {package.pk})",
        states={"status": package.status, "state": package.state},
        sentence=_package_sentence(package, now),
    )


def explain_file(raw_file: RawDataFile, now: datetime) -> Explanation:
    if raw_file.raw_data_package_id is None:
        sentence = (
            "not in a package yet: waits for the packaging manager, which packs the files of "
            "each (scan, instrument module) together"
        )
    else:
        package = RawDataPackage.objects.get(pk=raw_file.raw_data_package_id)
        sentence = f"in package {package.name}, which is {_package_sentence(package, now)}"
    return Explanation(
        title=f"raw data file {raw_file.relative_path} (id {raw_file.pk})",
        states={},
        sentence=sentence,
    )


def _copy_sentence(copy: PhysicalCopy, now: datetime) -> str:
    integrity = copy.integrity
    if integrity in (PhysicalCopy.Integrity.MISMATCH, PhysicalCopy.Integrity.MISSING):
        repair = copy.repairs.order_by("-created_at").first()
        if repair is None:
            return f"damaged ({integrity}); no repair has been scheduled yet"
        repairing = operation_sentence(repair, manager="repair", now=now)
        return f"damaged ({integrity}); repair {repair.pk} {repairing}"
    if copy.status == PhysicalCopyStatus.DELETED:
        return f"deleted {_when(copy.deleted_at)}: {copy.deletion_reason or 'no reason recorded'}"
    if copy.status in (
        PhysicalCopyStatus.DELETION_SCHEDULED,
        PhysicalCopyStatus.DELETION_IN_PROGRESS,
        PhysicalCopyStatus.DELETION_FAILED,
    ):
        task = copy.deletion_tasks.order_by("-created_at").first()
        detail = operation_sentence(task, manager="deletion", now=now) if task else "no task"
        return f"{copy.get_status_display().lower()} ({copy.deletion_reason}): {detail}"
    try:
        from pipelines.services.deletion import copy_deletion_blocker
    except ImportError:  # the deletion service is not installed in this checkout
        return f"{copy.get_status_display().lower()}, integrity {integrity}"
    return copy_deletion_blocker(copy)


def explain_copy(copy: PhysicalCopy, now: datetime) -> Explanation:
    verified = (
        f"verified {_ago(copy.checksum_verified_at, now)}"
        if copy.checksum_verified_at
        else "never verified"
    )
    return Explanation(
        title=(
            f"{copy.get_kind_display().lower()} copy {copy.pk} at {copy.location}: "
            f"{copy.relative_path}"
        ),
        states={"status": copy.status, "integrity": f"{copy.integrity} ({verified})"},
        sentence=_copy_sentence(copy, now),
    )


def explain_transfer(transfer: DataTransfer, now: datetime) -> Explanation:
    if transfer.status != Status.COMPLETED:
        sentence = operation_sentence(transfer, manager="transfer", now=now)
    elif transfer.unpack_status != Status.COMPLETED:
        sentence = "arrived; unpacking " + operation_sentence(
            transfer, manager="unpack", field_name="unpack_status", now=now
        )
    else:
        sentence = f"arrived at {transfer.destination_location} and unpacked"
    return Explanation(
        title=(
            f"transfer {transfer.pk} of {transfer.data_transfer_package.name}: "
            f"{transfer.origin_location} -> {transfer.destination_location}"
        ),
        states={"status": transfer.status, "unpack_status": transfer.unpack_status},
        sentence=sentence,
    )


def explain_archive(row: LongTermArchiveTransfer, now: datetime) -> Explanation:
    return Explanation(
        title=(
            f"archive transfer {row.pk}: {row.raw_data_package.name} -> {row.destination_location}"
        ),
        states={"status": row.status},
        sentence=operation_sentence(row, manager="archive", now=now),
    )


def explain_staging(job: StagingJob, now: datetime) -> Explanation:
    if job.status == Status.COMPLETED:
        sentence = f"staged at {job.destination_location}; " + (
            "kept while it is active" if job.active else "released: its copies may be deleted"
        )
    else:
        sentence = operation_sentence(job, manager="staging", now=now)
    return Explanation(
        title=f"staging job {job.pk} -> {job.destination_location}",
        states={"status": job.status, "active": str(job.active)},
        sentence=sentence,
    )


def explain_deletion(task: DeletionTask, now: datetime) -> Explanation:
    copy = task.physical_copy
    if task.status == Status.COMPLETED:
        sentence = f"done: the copy is {copy.get_status_display().lower()} ({task.reason})"
    else:
        waiting = operation_sentence(task, manager="deletion", now=now)
        sentence = f"{waiting}; judged safe because {task.reason}"
    return Explanation(
        title=f"deletion task {task.pk} of copy {copy.pk} at {copy.location}",
        states={"status": task.status, "copy": copy.status},
        sentence=sentence,
    )


def explain_repair(repair: CopyRepair, now: datetime) -> Explanation:
    return Explanation(
        title=f"repair {repair.pk} of copy {repair.physical_copy_id}",
        states={"status": repair.status},
        sentence=operation_sentence(repair, manager="repair", now=now),
    )


def _run_sentence(run: ExecutedReductionStep, now: datetime) -> str:
    status = run.status
    if status == RunStatus.PENDING:
        base = operation_sentence(run, manager="workflow", now=now) if run.lease_owner else ""
        return base or (
            "waits for the workflow manager to stage its data and submit it"
            + (f" (attempt {run.attempt} of {run.max_retries + 1})" if run.retry_count else "")
        )
    if status == RunStatus.STAGING_DATA:
        job = run.staging_job
        if job is None:
            return "staging its input data: no staging job yet"
        return f"waits for staging job {job.pk}, which {explain_staging(job, now).sentence}"
    if status in (RunStatus.SUBMITTED, RunStatus.RUNNING):
        return (
            f"{status} as job {run.hpc_job_id or '?'} since {_when(run.submitted_at)}; the result "
            "manager polls it"
        )
    if status == RunStatus.COLLECTING_RESULTS:
        return "its job finished; the result manager is registering its products"
    if status == RunStatus.FAILED:
        if run.is_terminal:
            return (
                f"failed for good after {run.attempt} attempts: {run.failure_reason or 'no reason'}"
            )
        return (
            f"failed ({run.failure_reason or 'no reason'}); will be retried (attempt "
            f"{run.attempt + 1} of {run.max_retries + 1})"
        )
    if status == RunStatus.CANCELLED:
        return f"cancelled: {run.failure_reason or 'by an operator'}"
    products = run.products.count()
    sentence = f"completed {_when(run.finished_at)} with {products} products"
    # Campaigns topic (issue 12): say whether its products are stale or superseded, and why.
    product = run.products.order_by(
        F("superseded_at").desc(nulls_last=True), F("stale_since").desc(nulls_last=True)
    ).first()
    if product is not None and (product.stale_since or product.superseded_at):
        from pipelines.services.products import product_staleness_sentence

        sentence += f"; its products are {product_staleness_sentence(product)}"
    return sentence


def explain_campaign(campaign: Campaign, now: datetime) -> Explanation:
    """Campaigns topic (issue 12): where a backfill or reprocessing stands."""
    pending = campaign.runs.filter(status=RunStatus.PENDING).count()
    if campaign.state == "active":
        sentence = (
            f"active: {campaign.runs_completed} of {campaign.runs_created} run(s) completed, "
            f"{campaign.runs_active - pending} in the workflow and {pending} waiting to be "
            f"admitted (at most {campaign.max_active} at a time), {campaign.runs_failed} "
            f"failed for good, {campaign.waiting} sub-group(s) to plan later"
        )
    else:
        sentence = (
            f"{campaign.state} {_when(campaign.finished_at)}: {campaign.runs_completed} of "
            f"{campaign.runs_created} run(s) completed, {campaign.runs_failed} failed, "
            f"{campaign.runs_cancelled} cancelled"
        )
    return Explanation(
        title=f"{campaign} ({campaign.reason or 'no reason given'})",
        states={"state": campaign.state},
        sentence=sentence,
    )


def explain_product(product: DataProduct, now: datetime) -> Explanation:
    """Campaigns topic (issue 12): a product is current, stale (and why) or superseded."""
    from pipelines.services.products import product_staleness_sentence

    return Explanation(
        title=f"product {product.pk}: {product.relative_path} of run {product.produced_by_id}",
        states={},
        sentence=product_staleness_sentence(product),
    )


def explain_run(run: ExecutedReductionStep, now: datetime) -> Explanation:
    return Explanation(
        title=f"run {run.pk}: {run.reduction_step} [{run.sub_group_key}]",
        states={"status": run.status},
        sentence=_run_sentence(run, now),
    )


def explain_step(
    step: ReductionStep, now: datetime, sub_group_key: str | None = None
) -> Explanation:
    try:
        from pipelines.services.triggers import explain_step as trigger_explain
    except ImportError:
        sentence = "the trigger manager is not installed in this checkout"
    else:
        sentence = trigger_explain(step, sub_group_key)
    suffix = f" [{sub_group_key}]" if sub_group_key else ""
    return Explanation(title=f"step {step}{suffix}", states={}, sentence=sentence)


EXPLAINERS: dict[type[models.Model], Callable[[Any, datetime], Explanation]] = {
    RawDataPackage: explain_package,
    RawDataFile: explain_file,
    PhysicalCopy: explain_copy,
    DataTransfer: explain_transfer,
    LongTermArchiveTransfer: explain_archive,
    StagingJob: explain_staging,
    DeletionTask: explain_deletion,
    CopyRepair: explain_repair,
    ExecutedReductionStep: explain_run,
    ReductionStep: explain_step,
    DataProduct: explain_product,  # campaigns (issue 12)
    Campaign: explain_campaign,  # campaigns (issue 12)
}

# ``manage.py why <kind>:<id>``: the kinds people type, and the model each names.
KINDS: dict[str, type[models.Model]] = {
    "package": RawDataPackage,
    "file": RawDataFile,
    "copy": PhysicalCopy,
    "transfer": DataTransfer,
    "archive": LongTermArchiveTransfer,
    "staging": StagingJob,
    "deletion": DeletionTask,
    "repair": CopyRepair,
    "run": ExecutedReductionStep,
    "step": ReductionStep,
    "bundle": DataTransferPackage,
    "product": DataProduct,  # campaigns (issue 12)
    "campaign": Campaign,  # campaigns (issue 12)
}

_SPEC = re.compile(r"^(?P<kind>[a-z]+):(?P<ref>.+)$")


def resolve(spec: str) -> tuple[models.Model, str | None]:
    """The object ``spec`` names, and a sub-group key for a step.

    Forms: ``package:<id or name>``, ``file:<uuid or relative path>``, ``copy:<id>``,
    ``transfer:<id>``, ``archive:<id>``, ``staging:<id>``, ``deletion:<id>``, ``repair:<id>``,
    ``run:<id>``, ``step:<pipeline>/<step>[@<sub group key>]``, ``bundle:<id or name>``.
    Raises WhyError naming what was not found."""
    match = _SPEC.match(spec.strip())
    if not match:
        kinds = ", ".join(KINDS)
        raise WhyError(f"{spec!r}: expected <kind>:<id or name>, kind one of: {kinds}")
    kind, ref = match["kind"], match["ref"].strip()
    model = KINDS.get(kind)
    if model is None:
        raise WhyError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    sub_group: str | None = None
    queryset: models.QuerySet[Any] = model._default_manager.all()
    if model is ReductionStep:
        path, _, sub_group = ref.partition("@")
        pipeline_name, slash, step_name = path.rpartition("/")
        if not slash:
            raise WhyError(f"{spec!r}: a step is named <pipeline>/<step>[@<sub group key>]")
        found = queryset.filter(pipeline__name=pipeline_name, name=step_name).first()
        if found is None:
            raise WhyError(f"no step {step_name!r} in a pipeline named {pipeline_name!r}")
        return found, sub_group or None
    found = None
    if model in (RawDataPackage, DataTransferPackage):
        found = queryset.filter(name=ref).first()
    if model is RawDataFile:
        found = queryset.filter(relative_path=ref).first()
        if found is None:
            try:
                found = queryset.filter(pk=ref).first()
            except Exception:  # not a UUID
                found = None
    if found is None and model is not RawDataFile:
        if not ref.isdigit():
            raise WhyError(f"{spec!r}: {kind} ids are numbers")
        found = queryset.filter(pk=int(ref)).first()
    if found is None:
        raise WhyError(f"no {kind} {ref!r}")
    return found, sub_group


def explain(obj: models.Model, *, sub_group_key: str | None = None) -> Explanation:
    """State, one sentence, and the latest ``EVENT_LIMIT`` events of ``obj``. Raises WhyError
    for an object of a kind nobody explains."""
    now = timezone.now()
    if isinstance(obj, DataTransferPackage):
        return _explain_bundle(obj, now)
    explainer = EXPLAINERS.get(type(obj))
    if explainer is None:
        raise WhyError(f"cannot explain a {type(obj).__name__}")
    if isinstance(obj, ReductionStep):
        result = explain_step(obj, now, sub_group_key)
    else:
        result = explainer(obj, now)
    result.events = list(
        StateEvent.objects.for_object(obj).order_by("-created_at", "-id")[:EVENT_LIMIT]
    )
    return result


def _explain_bundle(bundle: DataTransferPackage, now: datetime) -> Explanation:
    transfers = list(bundle.transfers.select_related("destination_location__site"))
    if bundle.status != Status.COMPLETED:
        sentence = "the bundle is not built yet: " + operation_sentence(
            bundle, manager="bundling", now=now
        )
    elif not transfers:
        sentence = "built; waits for the transfer manager to plan its transfer"
    else:
        parts = [
            f"to {t.destination_location}: {explain_transfer(t, now).sentence}" for t in transfers
        ]
        sentence = "; ".join(parts)
    return Explanation(
        title=f"transfer bundle {bundle.name} (id {bundle.pk})",
        states={"status": bundle.status},
        sentence=sentence,
        events=list(
            StateEvent.objects.for_object(bundle).order_by("-created_at", "-id")[:EVENT_LIMIT]
        ),
    )


def why_sentence(obj: models.Model) -> str:
    """Just the sentence, for admin change pages; a failure to explain is itself the answer."""
    try:
        return explain(obj).sentence
    except WhyError as exc:
        return str(exc)
