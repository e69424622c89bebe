"""Policy deletion (SPEC §4 item 5, ops-db §5.8, behaviours 14-18): which physical copies may go,
why, and the manager and worker that remove them.

A copy may be deleted only when every rule below lets it go; the verdict names the FIRST rule
that keeps it (or why it may go), in this order:

1. ``long_term_archive``: package, file and product copies in a long-term archive are never
   deleted by policy (a transfer bundle tar left in an archive by a DIRECT route is temporary
   and follows the bundle rules).
2. ``data_product``: product copies have no deletion policy yet.
3. ``status``: only PRESENT, STAGED, DELETION_POSSIBLE and DELETION_FAILED copies are candidates
   (a failed deletion waits ``RETRY_FAILED_AFTER`` and no live deletion task may exist).
4. ``not_archived``: the package is ARCHIVED (a file: its package; a bundle: every package in
   it, and every transfer of it that did not fail has arrived and been unpacked, including its
   primary transfer out of the observatory).
5. ``archive_copies``: at least ``required`` verified archive copies of each package exist, not
   counting this copy: PRESENT, integrity VERIFIED, in a LONG_TERM_ARCHIVE location, verified
   within that location's ``verification_interval``. ``required`` is the larger
   ``Site.min_archive_copies`` of the copy's site and the package's origin site.
6. ``in_use``: no active StagingJob of the package at this location, no live staging, transfer,
   bundle build or archive transfer reading or writing the package or bundle here, no
   non-terminal run with the package as input, no live CopyRepair of the object or sourced from
   this copy; a buffer copy stays until every active archive of its site holds the package (the
   archive manager reads it from there); a bundle copy stays while a secondary route still has
   to send it on from here.
7. ``package_copy_here``: a file copy waits while its package's copy at the same location is
   live; once that one is DELETED the file copies there become DELETION_POSSIBLE (behaviour 17).
8. ``retention``: ``package.archived_at + location.retention_period`` has passed (a bundle: its
   last package archived).

SOURCE file copies thus follow behaviour 16: rules 4 and 5 with ``required >= 1`` mean a
PRESENT, verified, ARCHIVED copy in a long-term archive exists before anything is scheduled.

No write skew: scheduling and the worker's start lock the object's package row
(``copy_lock_object``) and re-judge the copy in the same transaction; integrity moves take the
same lock, so they serialise and the later one sees the earlier. Only long-term archive copies
count as good copies for the rule and they are never deleted here, so two deletions of different
copies cannot remove each other's cover.

Every path to DELETED passes DELETION_SCHEDULED and DELETION_IN_PROGRESS, each with its reason
on the copy (``deletion_reason``) and in the StateEvent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, F, OuterRef, Q, Value
from django.utils import timezone

from pipelines.faults import pause_point
from pipelines.models import (
    DataLocation,
    DataTransferPackage,
    DeletionTask,
    PackageState,
    PhysicalCopy,
    RawDataPackage,
    StateEvent,
    Status,
)
from pipelines.services.copies import copy_lock_object
from pipelines.services.operations import (
    ClaimLost,
    operation_claim_and_dispatch,
    operation_complete,
    operation_start,
)
from pipelines.services.states import (
    TransitionConflict,
    record_creation,
    transition,
    transition_batch,
)
from pipelines.storage.base import storage_for

from .rules import (
    CANDIDATE_STATES,
    CHUNK,
    CS,
    KIND,
    LIVE,
    LOCK_BATCH,
    LT,
    RETRY_FAILED_AFTER,
    TICK_LIMIT,
    CopyRow,
    Judge,
    PlanEntry,
    Verdict,
    copy_deletion_blocker,
    copy_rows,
    deletion_verdict,
    location_label,
)

__all__ = [
    "CANDIDATE_STATES",
    "RETRY_FAILED_AFTER",
    "PlanEntry",
    "Verdict",
    "copy_deletion_blocker",
    "deletion_manager_tick",
    "deletion_orphans_settle",
    "deletion_plan",
    "deletion_verdict",
    "physical_copy_delete",
]

log = logging.getLogger(__name__)


# --- public: the plan ----------------------------------------------------------------------------
def _locations_in_order(location: DataLocation | None) -> list[DataLocation]:
    """Locations under disk pressure (not accepting writes) first, then the others."""
    locations = DataLocation.objects.select_related("site").order_by(
        "accepting_writes", "site__short_name", "name"
    )
    if location is not None:
        locations = locations.filter(pk=location.pk)
    return list(locations)


def _chunks(queryset: Any, size: int = CHUNK) -> Iterator[list[CopyRow]]:
    """``queryset`` in pages of ``size`` rows by ascending id (keyset pagination: each page is
    one indexed query, memory stays bounded however many rows there are)."""
    last = 0
    while True:
        rows = copy_rows(queryset.filter(pk__gt=last).order_by("pk")[:size])
        if not rows:
            return
        yield rows
        last = rows[-1].id
        if len(rows) < size:
            return


def deletion_plan(
    *,
    location: DataLocation | None = None,
    copies: Any = None,
    now: datetime | None = None,
) -> Iterator[PlanEntry]:
    """Every live (not DELETED) copy, at ``location`` or everywhere (``copies``: only those of
    this PhysicalCopy queryset), with its verdict: a dry run that changes nothing. Streams:
    copies are read and judged in chunks (a fixed number of queries per chunk), so memory stays
    bounded at any number of copies. Locations under disk pressure come first, then by site and
    name; copies by id within a location."""
    now = now or timezone.now()
    judge = Judge(now)
    for loc in _locations_in_order(location):
        live = PhysicalCopy.objects.filter(location=loc).exclude(status=CS.DELETED)
        if copies is not None:
            live = live.filter(pk__in=copies.values("pk"))
        for rows in _chunks(live):
            verdicts = judge.judge(rows)
            names = _object_names(rows)
            for row, verdict in zip(rows, verdicts, strict=True):
                yield PlanEntry(
                    copy_id=row.id,
                    location=location_label(loc),
                    kind=row.kind,
                    object_name=names.get(row.id, row.relative_path),
                    relative_path=row.relative_path,
                    status=row.status,
                    verdict=verdict,
                )


def _object_names(rows: list[CopyRow]) -> dict[int, str]:
    """Names of the packages and bundles of a chunk (files are named by their path)."""
    packages = {r.raw_data_package_id for r in rows if r.raw_data_package_id}
    bundles = {r.data_transfer_package_id for r in rows if r.data_transfer_package_id}
    names: dict[int, str] = {}
    if packages:
        by_id = dict(RawDataPackage.objects.filter(pk__in=packages).values_list("id", "name"))
        names.update({r.id: by_id[r.raw_data_package_id] for r in rows if r.raw_data_package_id})
    if bundles:
        by_id = dict(DataTransferPackage.objects.filter(pk__in=bundles).values_list("id", "name"))
        names.update(
            {r.id: by_id[r.data_transfer_package_id] for r in rows if r.data_transfer_package_id}
        )
    return names


# --- the manager ---------------------------------------------------------------------------------
def _candidates(loc: DataLocation, now: datetime) -> Any:
    """Copies at ``loc`` the rules may let go, narrowed in SQL by the cheap necessary
    conditions (a candidate state and kind; the package ARCHIVED, its retention here passed and
    at least one verified archive copy within its interval), so a tick does not judge copies
    that cannot go yet. The rules decide; this only skips what they would keep anyway."""
    copies = PhysicalCopy.objects.filter(location=loc, status__in=CANDIDATE_STATES).exclude(
        kind=KIND.DATA_PRODUCT
    )
    if loc.location_type == LT.LONG_TERM_ARCHIVE:
        return copies.filter(kind=KIND.DATA_TRANSFER_PACKAGE)
    released = now - loc.retention_period
    fresh_since = ExpressionWrapper(
        Value(now) - F("location__verification_interval"), output_field=DateTimeField()
    )

    def verified_archive_copy(package: str) -> Exists:
        return Exists(
            PhysicalCopy.objects.filter(
                raw_data_package_id=OuterRef(package),
                location__location_type=LT.LONG_TERM_ARCHIVE,
                status=CS.PRESENT,
                integrity=PhysicalCopy.Integrity.VERIFIED,
                checksum_verified_at__gte=fresh_since,
            )
        )

    return copies.filter(
        Q(kind=KIND.DATA_TRANSFER_PACKAGE)
        | Q(
            verified_archive_copy("raw_data_package_id"),
            kind=KIND.RAW_DATA_PACKAGE,
            raw_data_package__state=PackageState.ARCHIVED,
            raw_data_package__archived_at__lte=released,
        )
        | Q(
            verified_archive_copy("raw_data_file__raw_data_package_id"),
            kind=KIND.RAW_DATA_FILE,
            raw_data_file__raw_data_package__state=PackageState.ARCHIVED,
            raw_data_file__raw_data_package__archived_at__lte=released,
        )
    )


def deletion_manager_tick(
    *, owner: str, now: datetime | None = None, limit: int = TICK_LIMIT
) -> dict[str, int]:
    """One tick of the deletion manager: settle copies whose deletion task ended without
    finishing (``deletion_orphans_settle``), schedule up to ``limit`` deletable copies (locations
    not accepting writes first), then claim pending deletion tasks and send each to the
    deletion queue of its copy's location after the claim commits. Safe to run twice at once:
    scheduling re-judges each copy under its object's lock and a copy has one live task."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import delete_physical_copy

    now = now or timezone.now()
    orphans = deletion_orphans_settle(actor=f"manager:{owner}")
    scheduled = 0
    judge = Judge(now)
    for loc in _locations_in_order(None):
        if scheduled >= limit:
            break
        for rows in _chunks(_candidates(loc, now)):
            wanted = [r for r, v in zip(rows, judge.judge(rows), strict=True) if v.deletable]
            for start in range(0, len(wanted), LOCK_BATCH):
                batch = wanted[start : start + LOCK_BATCH][: limit - scheduled]
                if batch:
                    scheduled += _schedule(batch, now=now, actor=f"manager:{owner}")
            if scheduled >= limit:
                break
    due = DeletionTask.objects.due().order_by(
        "physical_copy__location__accepting_writes", "created_at", "pk"
    )
    claimed = operation_claim_and_dispatch(
        DeletionTask,
        delete_physical_copy,
        owner=owner,
        queryset=due,
        select_related=("physical_copy__location__site",),
        queue_of=lambda task: queue_name(task.physical_copy.location, OperationType.DELETION),
    )
    return {"orphans": orphans, "scheduled": scheduled, "claimed": claimed}


def _lock_order(copy: PhysicalCopy, file_packages: dict[int, int | None]) -> tuple[int, Any]:
    """The order copies' objects are locked in within one transaction: packages, then bundles,
    then other objects, each by id, so two managers locking overlapping sets cannot deadlock."""
    if copy.kind == KIND.RAW_DATA_PACKAGE:
        return (0, copy.raw_data_package_id)
    if copy.kind == KIND.RAW_DATA_FILE and file_packages.get(copy.pk):
        return (0, file_packages[copy.pk])
    if copy.kind == KIND.DATA_TRANSFER_PACKAGE:
        return (1, copy.data_transfer_package_id)
    return (2, str(copy.raw_data_file_id or copy.data_product_id))


def _schedule(rows: list[CopyRow], *, now: datetime, actor: str) -> int:
    """In one transaction: lock the objects of ``rows``' copies (each object once, in a fixed
    order), judge the copies again as they are now, and move each that may still go to
    DELETION_SCHEDULED (DELETION_FAILED ones too: the retry) with its reason, creating its
    pending DeletionTask. Returns how many were scheduled."""
    file_packages = {r.id: r.file_package_id for r in rows}
    with transaction.atomic():
        copies = sorted(
            PhysicalCopy.objects.filter(pk__in=[r.id for r in rows]),
            key=lambda c: _lock_order(c, file_packages),
        )
        locked: set[tuple[int, Any]] = set()
        for copy in copies:
            key = _lock_order(copy, file_packages)
            if key not in locked:
                copy_lock_object(copy)
                locked.add(key)
        fresh = copy_rows(PhysicalCopy.objects.filter(pk__in=[c.pk for c in copies]).order_by("pk"))
        judged = dict(zip([r.id for r in fresh], Judge(now).judge(fresh), strict=True))
        status = {r.id: r.status for r in fresh}
        tasks: list[DeletionTask] = []
        for copy in copies:
            verdict = judged[copy.pk]
            if not verdict.deletable:
                continue
            retry = status[copy.pk] == CS.DELETION_FAILED
            transition(
                copy,
                CS.DELETION_SCHEDULED,
                actor=actor,
                expected=status[copy.pk],
                reason=f"{'deletion retried' if retry else 'deletion scheduled'}: {verdict.reason}",
                updates={"deletion_reason": verdict.reason},
            )
            tasks.append(DeletionTask(physical_copy=copy, reason=verdict.reason))
        # One INSERT for the tasks and one for their creation events.
        DeletionTask.objects.bulk_create(tasks)
        StateEvent.objects.bulk_create(
            StateEvent(
                entity=DeletionTask._meta.db_table,
                object_id=str(task.pk),
                field="status",
                from_state="",
                to_state=Status.PENDING,
                actor=actor,
                reason=task.reason,
            )
            for task in tasks
        )
    return len(tasks)


def deletion_orphans_settle(*, actor: str, limit: int = 500) -> int:
    """Copies left mid-deletion without a live deletion task (its task gave up, e.g. after the
    workers running it died once too often): DELETION_IN_PROGRESS ones become DELETION_FAILED
    (their file may be gone or not; the retry finishes the job), DELETION_SCHEDULED ones get a
    new pending task. Nothing stays in either state without a task. Returns copies settled."""
    live = DeletionTask.objects.filter(physical_copy=OuterRef("pk"), status__in=LIVE)
    orphans = (
        PhysicalCopy.objects.filter(status__in=(CS.DELETION_SCHEDULED, CS.DELETION_IN_PROGRESS))
        .exclude(Exists(live))
        .order_by("pk")[:limit]
    )
    settled = 0
    for copy in orphans:
        try:
            with transaction.atomic():
                copy_lock_object(copy)
                if DeletionTask.objects.filter(physical_copy=copy, status__in=LIVE).exists():
                    continue
                last = DeletionTask.objects.filter(physical_copy=copy).order_by("-pk").first()
                why = (
                    f"deletion task {last.pk} ended {last.status}"
                    f"{': ' + last.failure_error_message if last.failure_error_message else ''}"
                    if last
                    else "no deletion task"
                )
                if copy.status == CS.DELETION_IN_PROGRESS:
                    transition(
                        copy,
                        CS.DELETION_FAILED,
                        actor=actor,
                        reason=f"deletion interrupted ({why}); retried later",
                        updates={"last_error": why[:5000], "retry_count": F("retry_count") + 1},
                    )
                else:
                    task = DeletionTask.objects.create(
                        physical_copy=copy, reason=copy.deletion_reason or "rescheduled"
                    )
                    record_creation(task, actor=actor, reason=f"rescheduled: {why}")
        except TransitionConflict:
            continue
        settled += 1
    return settled


# --- the worker ----------------------------------------------------------------------------------
def physical_copy_delete(task_id: int, *, token: str, owner: str) -> DeletionTask:
    """Delete the copy of one claimed DeletionTask.

    Under the object's lock, in one transaction: judge the copy again (``for_task``); when it
    may no longer go, withdraw the deletion (the copy back to PRESENT with the reason, the task
    completed as withdrawn); otherwise DELETION_SCHEDULED (from DELETION_FAILED on a retry) ->
    DELETION_IN_PROGRESS with the reason. That commit is the decision: from then on the copy is
    not counted as a good copy by anyone. Then, in a second transaction under the lock again,
    the last look: judged once more (an integrity failure may have been marked on another copy
    meanwhile; then the file stays and the deletion is withdrawn through DELETION_FAILED), the
    file or object removed (``Storage.delete``, idempotent), the copy DELETED with
    ``deleted_at``, a package copy's file copies at that location DELETION_POSSIBLE (behaviour
    17), and the task completed.

    A copy found DELETION_IN_PROGRESS (a worker died between the decision and the end) goes
    straight to the last look; if its file is already gone it is finished. A failing delete
    moves the copy to DELETION_FAILED with ``last_error`` and re-raises, so the
    task base class retries or fails the task; the retry moves the copy back through
    DELETION_SCHEDULED. Raises ``ClaimLost`` when the claim no longer holds the task."""
    task = DeletionTask.objects.select_related("physical_copy__location__site").get(pk=task_id)
    task = operation_start(task, token=token, owner=owner)
    copy = task.physical_copy
    actor = f"worker:{owner}"
    pause_point("deletion.before_decision")
    with transaction.atomic():
        copy_lock_object(copy)
        copy.refresh_from_db()
        if copy.status == CS.DELETED:
            return operation_complete(
                task, token=token, actor=actor, reason="the copy was already deleted"
            )
        reason = copy.deletion_reason or task.reason
        if copy.status != CS.DELETION_IN_PROGRESS:
            verdict = deletion_verdict(copy, for_task=task.pk)
            if not verdict.deletable and not _already_gone(copy):
                return _withdraw(task, copy, verdict, token=token, actor=actor)
            if verdict.deletable:
                reason = verdict.reason
            else:
                reason = f"the file was already gone after an earlier attempt ({verdict.reason})"
            if copy.status != CS.DELETION_SCHEDULED:
                transition(
                    copy,
                    CS.DELETION_SCHEDULED,
                    actor=actor,
                    reason=f"deletion retried by task {task.pk}: {reason}",
                    updates={"deletion_reason": reason},
                )
            transition(
                copy,
                CS.DELETION_IN_PROGRESS,
                actor=actor,
                reason=f"deleting: {reason}",
                updates={"deletion_reason": reason},
            )
    pause_point("deletion.mid_delete")
    # The last look: an integrity failure may have been marked on another copy since the
    # decision committed. Under the object's lock again, judge once more and remove the file
    # inside that transaction, so no mark can slip in between the judgement and the unlink
    # (a mark waits for the lock and then sees the copy DELETED). One unlink or one S3 request
    # is short enough to hold the lock for.
    try:
        with transaction.atomic():
            copy_lock_object(copy)
            copy.refresh_from_db()
            if copy.status != CS.DELETION_IN_PROGRESS:
                return operation_complete(
                    task,
                    token=token,
                    actor=actor,
                    reason=f"the copy is {copy.status} now; nothing left to delete",
                )
            last_look = deletion_verdict(copy, for_task=task.pk)
            storage = storage_for(copy.location)
            if not last_look.deletable and storage.exists(copy.relative_path):
                return _withdraw_in_progress(task, copy, last_look, token=token, actor=actor)
            storage.delete(copy.relative_path)
            transition(
                copy,
                CS.DELETED,
                actor=actor,
                reason=f"deleted: {reason}",
                expected=CS.DELETION_IN_PROGRESS,
                updates={"deleted_at": timezone.now()},
            )
            if copy.kind == KIND.RAW_DATA_PACKAGE:
                _file_copies_possible(copy, actor=actor, token=token)
            return operation_complete(
                task,
                token=token,
                actor=actor,
                reason=f"deleted {copy.relative_path} at {location_label(copy.location)}",
                updates={"idempotency_key": f"deletion_task:{task.pk}:deleted"},
            )
    except ClaimLost:
        raise
    except Exception as exc:
        error = f"{exc.__class__.__name__}: {exc}"
        with transaction.atomic():
            transition(
                copy,
                CS.DELETION_FAILED,
                actor=actor,
                reason=f"deletion failed: {error}",
                expected=CS.DELETION_IN_PROGRESS,
                updates={"last_error": error[:5000], "retry_count": F("retry_count") + 1},
            )
        raise


def _withdraw_in_progress(
    task: DeletionTask, copy: PhysicalCopy, verdict: Verdict, *, token: str, actor: str
) -> DeletionTask:
    """The last look found the copy no longer safe to delete while its file is still there:
    DELETION_IN_PROGRESS may only end in DELETED or DELETION_FAILED, so it passes through
    DELETION_FAILED (with the reason) back to PRESENT, and the task completes as withdrawn."""
    transition(
        copy,
        CS.DELETION_FAILED,
        actor=actor,
        reason=f"deletion stopped before removing the file: {verdict.reason}",
        expected=CS.DELETION_IN_PROGRESS,
    )
    return _withdraw(task, copy, verdict, token=token, actor=actor)


def _already_gone(copy: PhysicalCopy) -> bool:
    """A copy whose earlier deletion attempt failed may have lost its file anyway (the attempt
    died after removing it): then it must not be withdrawn as PRESENT."""
    if copy.status != CS.DELETION_FAILED:
        return False
    return not storage_for(copy.location).exists(copy.relative_path)


def _withdraw(
    task: DeletionTask, copy: PhysicalCopy, verdict: Verdict, *, token: str, actor: str
) -> DeletionTask:
    """The copy back to PRESENT (a scheduled or failed deletion only: a copy that is not on its
    way out stays as it is) and the task completed as withdrawn, with the reason."""
    if copy.status in (CS.DELETION_SCHEDULED, CS.DELETION_FAILED):
        transition(
            copy,
            CS.PRESENT,
            actor=actor,
            reason=f"deletion withdrawn: {verdict.reason}",
            updates={"deletion_reason": ""},
        )
    return operation_complete(
        task,
        token=token,
        actor=actor,
        reason=f"withdrawn: {verdict.reason}",
        updates={"idempotency_key": f"deletion_task:{task.pk}:withdrawn"},
    )


def _file_copies_possible(package_copy: PhysicalCopy, *, actor: str, token: str) -> None:
    """Behaviour 17: the file copies of a deleted package copy's package at the same location
    become DELETION_POSSIBLE (one UPDATE and one bulk event insert per state)."""
    files = PhysicalCopy.objects.filter(
        kind=KIND.RAW_DATA_FILE,
        raw_data_file__raw_data_package_id=package_copy.raw_data_package_id,
        location_id=package_copy.location_id,
    )
    marker = f"package copy {package_copy.pk} deleted ({token[:8]})"
    for state in (CS.PRESENT, CS.STAGED):
        transition_batch(
            files,
            CS.DELETION_POSSIBLE,
            expected=state,
            actor=actor,
            reason=f"package copy {package_copy.pk} at this location was deleted",
            updates={"deletion_reason": marker},
            marker="deletion_reason",
        )
