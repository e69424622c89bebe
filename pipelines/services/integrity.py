"""Integrity: re-verify copies on a schedule, mark the damaged ones, repair them from good ones.

Three entry points, each a plain function:

- ``copy_verify(copy)`` reads one copy's bytes back in full, outside any lock, and records the
  result: VERIFIED (or a refreshed verification time), or ``copy_mark_damaged`` (MISMATCH or
  MISSING). Used by the integrity manager's workers, ``manage.py verify_copies`` and the admin.
- ``copy_mark_damaged(copy, integrity)`` is the one way a copy becomes damaged: under the
  object's package-row lock (``copy_lock_object``), with an event, a warning, and a pending
  ``CopyRepair``. The storage audit calls it for lost copies.
- ``copy_repair_run(repair_id)`` is the repair worker's service: copy the object from a VERIFIED
  copy (never a damaged or unverified one) to a temporary name next to the damaged copy, check
  the bytes that landed, rename them over the damaged path, and move the copy back to VERIFIED
  with an event naming the source. The row keeps its id and history.

Managers: ``integrity_manager_tick`` claims due copies (``verification_claimed_until`` by a
conditional UPDATE) and dispatches ``verify_physical_copy`` to each location's integrity_check
queue; ``repair_manager_tick`` claims pending CopyRepairs and dispatches ``repair_physical_copy``
to the damaged copy's location, whose workers can write there.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from pipelines.exceptions import NonRetryableError, OperationError, StorageUnavailable
from pipelines.models import (
    CopyRepair,
    PhysicalCopy,
    PhysicalCopyStatus,
    Status,
)
from pipelines.storage.base import STORAGES, ObjectNotFound, Storage, copy, storage_for

from .copies import copy_lock_object
from .operations import (
    LeaseKeeper,
    operation_claim_and_dispatch,
    operation_complete,
    operation_start,
)
from .states import TransitionConflict, connection_supports_skip_locked, record_creation, transition

log = logging.getLogger(__name__)
# Operators route this logger to their alerting (as for permanently failed operations).
alerts = logging.getLogger("pipelines.alerts")

Integrity = PhysicalCopy.Integrity
_S = PhysicalCopyStatus

# Copies whose bytes are meant to be on storage now: worth reading back. DELETION_IN_PROGRESS,
# DELETION_FAILED and DELETED copies may legitimately be gone or half gone.
VERIFIABLE = (_S.PRESENT, _S.STAGED, _S.DELETION_POSSIBLE, _S.DELETION_SCHEDULED)
# Copies the facility relies on: re-verified by the manager, repaired when damaged, and the only
# copies a repair reads from.
LIVE = (_S.PRESENT, _S.STAGED)
DAMAGED = (Integrity.MISMATCH, Integrity.MISSING)
LIVE_REPAIR = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)

# What copy_verify returns.
VERIFIED, MISMATCH, MISSING, SKIPPED = "verified", "mismatch", "missing", "skipped"
OUTCOMES = (VERIFIED, MISMATCH, MISSING, SKIPPED)

# A repair writes next to the damaged copy under this marker plus the repair's id, so a retry of
# the same repair (after a killed worker) overwrites the same temporary object instead of adding
# one, and the storage audit can tell a repair's temporary file from a dark file.
REPAIR_TEMP_MARKER = ".repair-"

# The object column of each kind of copy.
_OBJECT_FIELD: dict[str, str] = {
    PhysicalCopy.Kind.RAW_DATA_FILE: "raw_data_file",
    PhysicalCopy.Kind.RAW_DATA_PACKAGE: "raw_data_package",
    PhysicalCopy.Kind.DATA_TRANSFER_PACKAGE: "data_transfer_package",
    PhysicalCopy.Kind.DATA_PRODUCT: "data_product",
}


# What a verification reads besides the copy: load copies with these (``select_related``)
# before handing them to ``copy_verify``.
VERIFY_RELATED = ("location__site", *_OBJECT_FIELD.values())


class NoGoodSource(NonRetryableError):
    """No VERIFIED live copy of the object exists to repair from; an operator must step in."""


@dataclass(frozen=True)
class Verification:
    """The result of reading one copy back: ``outcome`` (one of ``OUTCOMES``), a sentence for
    people, and whether the claim should be kept to expire (the storage could not be read, so
    trying again at once would fail the same way)."""

    outcome: str
    message: str
    retry_later: bool = False


def repair_temp_path(relative_path: str, repair_id: int) -> str:
    """Where repair ``repair_id`` writes before renaming over ``relative_path``: the same
    directory (a rename within one directory is atomic on POSIX)."""
    return f"{relative_path}{REPAIR_TEMP_MARKER}{repair_id}"


def copy_object(copy: PhysicalCopy) -> Any:
    """The file, package, bundle or product ``copy`` is a copy of."""
    return getattr(copy, _OBJECT_FIELD[copy.kind])


def expected_checksum(copy: PhysicalCopy) -> tuple[str, str]:
    """``(checksum, algorithm)`` registered for ``copy``'s object: what its bytes must hash to.
    The object's algorithm wins over the location's (a package built at a sha256 buffer keeps
    its sha256 checksum in an xxh3 archive). The checksum is "" when none is registered yet."""
    obj = copy_object(copy)
    return obj.checksum or "", obj.checksum_algorithm


# --- verification --------------------------------------------------------------------------------
def copy_verify(copy: PhysicalCopy, *, actor: str) -> str:
    """Read ``copy``'s bytes back in full and record what was found; returns ``"verified"``,
    ``"mismatch"``, ``"missing"`` or ``"skipped"`` (see ``copy_verify_detail``)."""
    return copy_verify_detail(copy, actor=actor).outcome


def copy_verify_detail(copy: PhysicalCopy, *, actor: str) -> Verification:
    """Read ``copy``'s bytes back (the storage's checksum with the object's algorithm), outside
    any lock and transaction, compare them with the object's registered checksum, and record:

    - equal: integrity VERIFIED with an event when it was not, else only ``verified_checksum``
      and ``checksum_verified_at`` refreshed (VERIFIED -> VERIFIED is not a move);
    - different: ``copy_mark_damaged(..., MISMATCH)``; not on storage (checked twice, and only
      while the location itself answers): ``copy_mark_damaged(..., MISSING)``.

    ``copy`` as the caller loaded it is the baseline, and it is not read again: its status
    decides whether the bytes are read, and the result is recorded only while the row still has
    the integrity and verification time the instance had (conditional UPDATE, or
    ``copy_mark_damaged``'s re-check under the lock). A stale instance therefore never records
    over a newer result; it is skipped. Callers load the copy with its location and object
    (``select_related``) just before: a verification pass then costs one UPDATE per copy beside
    the read, which matters for small files with a fast checksum. The instance is updated with
    what was recorded.

    Skipped, with nothing changed: a copy not in a ``VERIFIABLE`` status, an object with no
    registered checksum, a location that cannot be reached or read (``retry_later``), and a
    result that is stale because the copy's integrity or verification time changed since the
    instance was loaded (a repair or another verification recorded a newer result first)."""
    if copy.status not in VERIFIABLE:
        return Verification(SKIPPED, f"copy is {copy.status}; not read back")
    expected, algorithm = expected_checksum(copy)
    if not expected:
        return Verification(SKIPPED, "no checksum registered for the object yet")
    seen_integrity, seen_at = copy.integrity, copy.checksum_verified_at
    try:
        storage = storage_for(copy.location)
        try:
            digest, size = storage.checksum(copy.relative_path, algorithm)
        except ObjectNotFound:
            # Ask once more by name: a read may fail with "not found" in ways a lookup does not
            # (a racing rename), and a lost copy is marked only after this re-check.
            if storage.exists(copy.relative_path):
                return Verification(SKIPPED, "not found on read but present on lookup", True)
            return _record_damage(
                copy,
                Integrity.MISSING,
                actor=actor,
                reason=f"not on storage at {storage.label}: {copy.relative_path}",
                seen=(seen_integrity, seen_at),
            )
    except (OperationError, OSError) as exc:
        log.warning("integrity: copy %s could not be read: %s", copy.pk, exc)
        return Verification(SKIPPED, f"could not be read: {exc}", True)
    if digest != expected:
        return _record_damage(
            copy,
            Integrity.MISMATCH,
            actor=actor,
            reason=(
                f"checksum mismatch at {storage.label}: {copy.relative_path} reads back as "
                f"{algorithm} {digest[:16]}... ({size} bytes), registered {expected[:16]}..."
            ),
            seen=(seen_integrity, seen_at),
        )
    return _record_good(copy, digest, actor=actor, seen=(seen_integrity, seen_at), size=size)


def _record_good(
    copy: PhysicalCopy, digest: str, *, actor: str, seen: tuple[str, Any], size: int
) -> Verification:
    seen_integrity, seen_at = seen
    now = timezone.now()
    fresh = {"verified_checksum": digest, "checksum_verified_at": now}
    # The row must still be as it was when the read began; otherwise a newer result stands.
    unchanged = {"checksum_verified_at": seen_at}
    if seen_integrity == Integrity.VERIFIED:
        with transaction.atomic():
            _relax_commit()
            moved = PhysicalCopy.objects.filter(
                pk=copy.pk, integrity=Integrity.VERIFIED, **unchanged
            ).update(**fresh, updated_at=now)
        if not moved:
            return Verification(SKIPPED, "a newer result was recorded while reading")
        copy.verified_checksum, copy.checksum_verified_at = digest, now
        return Verification(VERIFIED, f"checksum verified ({size} bytes)")
    try:
        transition(
            copy,
            Integrity.VERIFIED,
            field="integrity",
            expected=seen_integrity,
            actor=actor,
            reason=f"read back in full: checksum matches ({size} bytes)",
            where=unchanged,
            updates=fresh,
        )
    except TransitionConflict:
        return Verification(SKIPPED, "a newer result was recorded while reading")
    return Verification(VERIFIED, f"checksum verified ({size} bytes), was {seen_integrity}")


def _relax_commit() -> None:
    """On PostgreSQL, let the current transaction commit without waiting for its WAL flush
    (``SET LOCAL synchronous_commit = off``). Only for the refresh of a good re-verification's
    time: a crash may lose the last few hundred milliseconds of such refreshes, and then those
    copies are simply due again. That wait is most of a refresh's cost, which a pass over many
    small fast-checksum files pays once per copy. State moves keep the default."""
    connection = transaction.get_connection()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _record_damage(
    copy: PhysicalCopy, integrity: str, *, actor: str, reason: str, seen: tuple[str, Any]
) -> Verification:
    outcome = MISMATCH if integrity == Integrity.MISMATCH else MISSING
    # Not moved is still the outcome when the copy was already known damaged this way (the
    # command re-reading a damaged copy); anything else means a newer result stands.
    if not copy_mark_damaged(copy, integrity, actor=actor, reason=reason, seen=seen):
        copy.refresh_from_db()
        if copy.integrity != integrity or copy.status not in VERIFIABLE:
            return Verification(SKIPPED, "a newer result was recorded while reading")
    return Verification(outcome, reason)


def copy_mark_damaged(
    copy: PhysicalCopy,
    integrity: str,
    *,
    actor: str,
    reason: str,
    seen: tuple[str, Any] | None = None,
) -> bool:
    """Mark ``copy`` MISMATCH or MISSING and schedule its repair, in one transaction that first
    takes the object's package-row lock (``copy_lock_object``) and re-reads the copy, so this
    move and any other move that reduces the object's good copies (a deletion start) run one
    after the other and each sees the other's result.

    The move writes an event with ``reason`` and a warning to the ``pipelines.alerts`` log. A
    pending ``CopyRepair`` is created when the copy is PRESENT or STAGED and has no live repair
    (a copy already damaged whose last repair failed gets no new one: an operator resets the
    failed repair). Scheduled deletions are left alone: whether one is still safe is the
    deletion manager's re-check.

    Returns True when the integrity moved; False when the copy already had that integrity, is
    DELETED or being deleted (its bytes going away is expected), or, with ``seen`` =
    ``(integrity, checksum_verified_at)`` from before a read, when the row changed since (a
    newer result stands). ``ValueError`` for an ``integrity`` that is not a damage."""
    if integrity not in DAMAGED:
        raise ValueError(f"{integrity!r} is not a damaged integrity ({', '.join(DAMAGED)})")
    with transaction.atomic():
        copy_lock_object(copy)
        fresh = PhysicalCopy.objects.select_related("location__site").get(pk=copy.pk)
        if fresh.status in (_S.DELETED, _S.DELETION_IN_PROGRESS):
            return False
        if seen is not None and (fresh.integrity, fresh.checksum_verified_at) != seen:
            return False
        moved = False
        if fresh.integrity != integrity:
            transition(
                fresh,
                integrity,
                field="integrity",
                actor=actor,
                reason=reason,
                updates={"verification_claimed_until": None},
            )
            moved = True
            alerts.warning(
                "copy %s (%s at %s) is %s: %s",
                fresh.pk,
                fresh.get_kind_display(),
                fresh.location,
                integrity,
                reason,
            )
        if fresh.status in LIVE:
            _schedule_repair(fresh, actor=actor, reason=reason, after_failure_too=not moved)
    copy.refresh_from_db()
    return moved


def _schedule_repair(
    copy: PhysicalCopy, *, actor: str, reason: str, after_failure_too: bool
) -> CopyRepair | None:
    existing = CopyRepair.objects.filter(physical_copy=copy)
    blocking = LIVE_REPAIR + ((Status.FAILED,) if after_failure_too else ())
    if existing.filter(status__in=blocking).exists():
        return None
    try:
        with transaction.atomic():
            repair = CopyRepair.objects.create(physical_copy=copy, reason=reason[:2000])
            record_creation(repair, actor=actor, reason=f"repair scheduled: {reason}"[:2000])
    except IntegrityError:
        return None  # a live repair was created meanwhile (copy_repair_one_live_per_copy)
    return repair


# --- the integrity manager -----------------------------------------------------------------------
def copies_due_for_verification(now: datetime | None = None) -> models.QuerySet[PhysicalCopy]:
    """Copies the integrity manager should read back now, oldest verification first: live
    (PRESENT or STAGED), not known damaged (those wait for their repair), never verified or
    verified longer ago than their location's ``verification_interval``, not claimed by a
    verification in flight, with an object that has a checksum to compare with, at an active
    location of a storage type this system can read (an inactive location's queues have no
    workers; a tape location has no storage backend yet)."""
    now = now or timezone.now()
    no_checksum = Q()
    for kind, field in _OBJECT_FIELD.items():
        no_checksum |= Q(kind=kind, **{f"{field}__checksum": ""})
    return (
        PhysicalCopy.objects.filter(
            status__in=LIVE,
            integrity__in=(Integrity.UNVERIFIED, Integrity.VERIFIED),
            location__active=True,
            location__storage_type__in=list(STORAGES),
        )
        .filter(
            Q(checksum_verified_at__isnull=True)
            | Q(checksum_verified_at__lt=now - F("location__verification_interval"))
        )
        .filter(Q(verification_claimed_until__isnull=True) | Q(verification_claimed_until__lt=now))
        .exclude(no_checksum)
        .order_by(F("checksum_verified_at").asc(nulls_first=True), "pk")
    )


def copies_claim_for_verification(
    candidates: models.QuerySet[PhysicalCopy], *, limit: int, lease_seconds: int | None = None
) -> tuple[datetime, list[int]]:
    """Claim up to ``limit`` copies of ``candidates`` whose claim is free by one conditional
    UPDATE of ``verification_claimed_until``. Returns the claim's expiry (the value the worker
    clears it from) and the ids claimed. On PostgreSQL the candidates are locked with SKIP
    LOCKED, so two managers take disjoint batches; elsewhere the conditional UPDATE decides. The
    expiry carries random microseconds so two managers' claims in the same instant differ."""
    now = timezone.now()
    seconds = lease_seconds or settings.WORKFLOW_LEASE_SECONDS
    until = now + timedelta(seconds=seconds, microseconds=random.randrange(1, 1_000_000))
    free = Q(verification_claimed_until__isnull=True) | Q(verification_claimed_until__lt=now)
    with transaction.atomic():
        query = candidates.filter(free)
        if connection_supports_skip_locked(candidates.db):
            query = query.select_for_update(skip_locked=True, of=("self",))
        ids = list(query.values_list("pk", flat=True)[:limit])
        if not ids:
            return until, []
        PhysicalCopy.objects.filter(free, pk__in=ids).update(verification_claimed_until=until)
        claimed = set(
            PhysicalCopy.objects.filter(pk__in=ids, verification_claimed_until=until).values_list(
                "pk", flat=True
            )
        )
    return until, [pk for pk in ids if pk in claimed]


def copies_dispatch_verification(ids: Iterable[int], until: datetime) -> None:
    """Enqueue ``verify_physical_copy`` for each claimed copy on its location's integrity_check
    queue once the claim commits. A copy whose enqueue fails keeps its claim until it expires,
    then is due again."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import verify_physical_copy

    rows = PhysicalCopy.objects.filter(pk__in=list(ids)).select_related("location__site")
    for row in rows:
        queue = queue_name(row.location, OperationType.INTEGRITY_CHECK)
        transaction.on_commit(
            functools.partial(_enqueue_verification, verify_physical_copy, row.pk, until, queue)
        )


def _enqueue_verification(task: Any, pk: int, until: datetime, queue: str) -> None:
    try:
        task.apply_async(args=[pk], kwargs={"claimed_until": until.isoformat()}, queue=queue)
    except Exception:
        log.exception("could not enqueue the verification of copy %s on %s", pk, queue)


def integrity_manager_tick(*, owner: str, limit: int = 200) -> dict[str, int]:
    """The integrity manager: claim a bounded batch of due copies
    (``copies_due_for_verification``) and dispatch one verification each. Returns counts."""
    until, ids = copies_claim_for_verification(copies_due_for_verification(), limit=limit)
    copies_dispatch_verification(ids, until)
    return {"claimed": len(ids)}


def copies_verify_now(copies: Iterable[PhysicalCopy]) -> int:
    """An operator's "verify now" (admin action): claim the given copies that are VERIFIABLE and
    not claimed already, whatever their last verification, and dispatch their verifications to
    the workers. Returns how many were dispatched."""
    pks = [c.pk for c in copies]
    candidates = PhysicalCopy.objects.filter(pk__in=pks, status__in=VERIFIABLE).order_by("pk")
    with transaction.atomic():
        until, ids = copies_claim_for_verification(candidates, limit=len(pks) or 1)
        copies_dispatch_verification(ids, until)
    return len(ids)


def copy_verification_run(copy_id: int, *, claimed_until: str, actor: str) -> Verification:
    """The verification worker's service: ``copy_verify_detail`` of one claimed copy, then the
    claim is released (conditional on it still being this claim). A copy whose storage could
    not be read keeps its claim until it expires, which spaces out the next attempt by a lease
    period instead of retrying every tick. A copy that no longer exists is skipped."""
    copy = PhysicalCopy.objects.select_related(*VERIFY_RELATED).filter(pk=copy_id).first()
    if copy is None:
        return Verification(SKIPPED, f"copy {copy_id} does not exist")
    result = copy_verify_detail(copy, actor=actor)
    until = parse_datetime(claimed_until) if claimed_until else None
    if until is not None and not result.retry_later:
        PhysicalCopy.objects.filter(pk=copy_id, verification_claimed_until=until).update(
            verification_claimed_until=None
        )
    return result


# --- repair --------------------------------------------------------------------------------------
def repair_manager_tick(*, owner: str, limit: int = 100) -> dict[str, int]:
    """The repair manager: claim pending CopyRepairs and dispatch ``repair_physical_copy`` to
    the integrity_check queue of the damaged copy's location (its workers write there)."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import repair_physical_copy

    claimed = operation_claim_and_dispatch(
        CopyRepair,
        repair_physical_copy,
        owner=owner,
        limit=limit,
        select_related=("physical_copy__location__site",),
        queue_of=lambda row: queue_name(row.physical_copy.location, OperationType.INTEGRITY_CHECK),
    )
    return {"claimed": claimed}


def repair_sources(copy: PhysicalCopy) -> models.QuerySet[PhysicalCopy]:
    """The copies a repair of ``copy`` may read from, best first: live copies of the same object
    with integrity VERIFIED (never MISMATCH, MISSING or UNVERIFIED, never ``copy`` itself),
    verified against the object's registered checksum; copies at the same site first (no
    long-haul traffic), then the most recently verified."""
    expected, _algorithm = expected_checksum(copy)
    field = _OBJECT_FIELD[copy.kind]
    same_site = models.Case(
        models.When(location__site_id=copy.location.site_id, then=0),
        default=1,
        output_field=models.IntegerField(),
    )
    return (
        PhysicalCopy.objects.filter(
            kind=copy.kind,
            status__in=LIVE,
            integrity=Integrity.VERIFIED,
            verified_checksum=expected,
            **{f"{field}_id": getattr(copy, f"{field}_id")},
        )
        .exclude(pk=copy.pk)
        .select_related("location__site")
        .annotate(remote=same_site)
        .order_by("remote", F("checksum_verified_at").desc(nulls_last=True), "pk")
    )


def copy_repair_run(
    repair_id: int, *, token: str, owner: str, lease_seconds: int | None = None
) -> CopyRepair:
    """Repair one claimed CopyRepair: write the object's bytes from the best ``repair_sources``
    copy to ``repair_temp_path`` next to the damaged copy, read them back, and only when they
    hash to the registered checksum rename them over the damaged path and move the copy to
    VERIFIED (event naming the source) while completing the repair, in one transaction.

    A source whose bytes turn out not to match is itself marked damaged (and gets a repair) and
    the next source is tried. No good source: ``NoGoodSource`` (the task fails the repair for
    good; it stays on /health). A copy that is already VERIFIED again, or is no longer live,
    needs nothing: the repair completes saying so. Safe to repeat: a retry after a killed worker
    overwrites the same temporary object, and a temporary object is removed on failure."""
    row = CopyRepair.objects.select_related("physical_copy__location__site").get(pk=repair_id)
    row = operation_start(row, token=token, owner=owner, lease_seconds=lease_seconds)
    actor = f"worker:{owner}"
    damaged = row.physical_copy
    damaged.refresh_from_db()
    if damaged.integrity not in DAMAGED or damaged.status not in LIVE:
        return _complete_without_copy(row, damaged, token=token, actor=actor)
    expected, algorithm = expected_checksum(damaged)
    if not expected:
        raise NoGoodSource(f"copy {damaged.pk}: no checksum registered for its object")
    target = storage_for(damaged.location)
    temp = repair_temp_path(damaged.relative_path, row.pk)
    tried: list[str] = []
    try:
        for source in repair_sources(damaged):
            with LeaseKeeper(
                CopyRepair, row.pk, token=token, lease_seconds=lease_seconds
            ) as keeper:
                good = _write_temp(source, target, temp, expected, algorithm, actor=actor)
                keeper.check()
            if not good:
                tried.append(f"copy {source.pk} at {source.location} (did not match)")
                continue
            return _install(row, damaged, source, target, temp, expected, token, actor)
    except BaseException:
        _remove_quietly(target, temp)
        raise
    _remove_quietly(target, temp)
    others = PhysicalCopy.objects.filter(
        **{_OBJECT_FIELD[damaged.kind]: copy_object(damaged)}
    ).exclude(pk=damaged.pk)
    found = ", ".join(f"{c.location}: {c.status}/{c.integrity}" for c in others) or "none"
    raise NoGoodSource(
        f"copy {damaged.pk} ({damaged.relative_path} at {damaged.location}) cannot be repaired: "
        f"no live VERIFIED copy of the same object to read from"
        + (f"; tried {'; '.join(tried)}" if tried else "")
        + f" (other copies: {found})"
    )


def _write_temp(
    source: PhysicalCopy,
    target: Storage,
    temp: str,
    expected: str,
    algorithm: str,
    *,
    actor: str,
) -> bool:
    """Copy ``source`` to ``temp`` and read it back. False (and the source marked MISMATCH)
    when the bytes that came out of the source do not match; a write that reads back wrong
    raises (retryable): the target, not the source, is at fault."""
    reader = storage_for(source.location)
    try:
        sent, _size = copy(reader, source.relative_path, target, temp, algorithm=algorithm)
    except ObjectNotFound:
        if reader.exists(source.relative_path):
            raise StorageUnavailable(f"source copy {source.pk} vanished during the read") from None
        copy_mark_damaged(
            source,
            Integrity.MISSING,
            actor=actor,
            reason=f"not on storage at {reader.label} when read as a repair source",
        )
        return False
    if sent != expected:
        copy_mark_damaged(
            source,
            Integrity.MISMATCH,
            actor=actor,
            reason=(
                f"read as a repair source at {reader.label}, {source.relative_path} hashes to "
                f"{sent[:16]}..., registered {expected[:16]}..."
            ),
        )
        return False
    landed, _size = target.checksum(temp, algorithm)
    if landed != expected:
        raise StorageUnavailable(
            f"{target.label}: repair bytes at {temp!r} read back as {landed[:16]}..., "
            f"sent {expected[:16]}...; will try again"
        )
    return True


def _install(
    row: CopyRepair,
    damaged: PhysicalCopy,
    source: PhysicalCopy,
    target: Storage,
    temp: str,
    checksum: str,
    token: str,
    actor: str,
) -> CopyRepair:
    damaged.refresh_from_db()
    if damaged.status not in LIVE:
        # Deleted meanwhile: do not bring its file back.
        _remove_quietly(target, temp)
        return _complete_without_copy(row, damaged, token=token, actor=actor)
    target.rename(temp, damaged.relative_path)
    now = timezone.now()
    reason = f"repaired from copy {source.pk} at {source.location} (repair {row.pk})"
    with transaction.atomic():
        row = operation_complete(
            row,
            token=token,
            actor=actor,
            reason=reason,
            updates={
                "source_copy": source,
                "idempotency_key": f"copy_repair:{row.pk}:{checksum}",
            },
        )
        fresh = PhysicalCopy.objects.get(pk=damaged.pk)
        updates = {
            "verified_checksum": checksum,
            "checksum_verified_at": now,
            "verification_claimed_until": None,
        }
        if fresh.integrity == Integrity.VERIFIED:
            PhysicalCopy.objects.filter(pk=fresh.pk).update(**updates, updated_at=now)
        else:
            transition(
                fresh,
                Integrity.VERIFIED,
                field="integrity",
                actor=actor,
                reason=reason,
                updates=updates,
                context={"source_copy": source.pk, "repair": row.pk},
            )
    log.info("copy %s %s", damaged.pk, reason)
    return row


def _complete_without_copy(
    row: CopyRepair, damaged: PhysicalCopy, *, token: str, actor: str
) -> CopyRepair:
    why = (
        f"nothing to repair: copy is {damaged.status}"
        if damaged.status not in LIVE
        else f"nothing to repair: copy is {damaged.integrity} again"
    )
    return operation_complete(row, token=token, actor=actor, reason=why)


def _remove_quietly(storage: Storage, relative_path: str) -> None:
    # Best effort: a leftover is overwritten by the next try of the same repair.
    try:
        storage.delete(relative_path)
    except Exception:
        log.warning("could not remove repair temporary %s at %s", relative_path, storage.label)


# --- reports -------------------------------------------------------------------------------------
def integrity_counts() -> dict[str, int]:
    """Copies known damaged and repairs that failed for good, for /health: data problems an
    operator must see, not outages."""
    damaged = dict(
        PhysicalCopy.objects.filter(integrity__in=DAMAGED)
        .exclude(status=_S.DELETED)
        .values_list("integrity")
        .annotate(n=models.Count("pk"))
        .values_list("integrity", "n")
    )
    return {
        "mismatch": int(damaged.get(Integrity.MISMATCH, 0)),
        "missing": int(damaged.get(Integrity.MISSING, 0)),
        "repairs_pending": CopyRepair.objects.filter(status__in=LIVE_REPAIR).count(),
        "repairs_failed": CopyRepair.objects.filter(status=Status.FAILED).count(),
    }
