"""The storage audit: what is on a location's storage against what the database says is there.

``audit_storage(location)`` walks the storage once and compares it with the location's live
copies (every status but DELETED):

- **dark files**: on storage, but no live copy has that relative path. Recorded in ``DarkFile``
  (first seen kept, last seen and size refreshed) for an operator to look at; the audit never
  deletes a file, and nothing else does automatically. A recorded dark file that is no longer
  on storage, or that a copy now accounts for, loses its row ("dark gone").
- **lost copies**: a PRESENT or STAGED copy whose file the listing did not contain. That one
  file is looked up again (``Storage.exists``: it may have been written or renamed while the
  walk went past) and only when it is still absent is the copy marked MISSING, through
  ``integrity.copy_mark_damaged``, which takes the object's lock, records the event and
  schedules a repair. Copies being deleted (any deletion status), already MISSING, or
  registered after the audit started are never marked by it.

What the audit leaves alone, because a live operation may own it: files modified after the
audit started (recorded as skipped; a dark file already recorded keeps its row), temporary
files of writes in progress (names ending ``.partial``, ``.tmp`` or ``.part``, or containing
``.repair-``; POSIX storage already hides its own ``.<name>.<random>.partial`` files), and in a
PROCESSING location the run workspaces under ``pipelines/`` (a run writes there; a registered
data product there is still compared like any copy) and the tars of live staging jobs under
``staging/<job id>/``.

Memory stays bounded however many files there are: the listing is streamed in code-point order
(``Storage.list_entries``) and merged with one streamed, identically ordered query of the
location's live copies, a chunk of ``chunk_size`` listed files at a time; no set of all paths
is built. Per chunk the audit issues at most three queries for dark files, served by the unique
index on location and path (on SQLite its parameter limit splits the upsert into batches),
plus the re-check and mark of each lost copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any

from django.db import connection
from django.db.models.functions import Collate
from django.utils import timezone

from pipelines.models import (
    DarkFile,
    DataLocation,
    PhysicalCopy,
    PhysicalCopyStatus,
    StagingJob,
    Status,
)
from pipelines.storage.base import Storage, StoredObject, storage_for

from .integrity import REPAIR_TEMP_MARKER

log = logging.getLogger(__name__)
_S = PhysicalCopyStatus
LT = DataLocation.LocationType

#: Listed files compared with the database per step (and per dark-file query).
AUDIT_CHUNK_SIZE = 2000
# Name endings and fragments of temporary files that writers of this system (and common tools)
# rename into place when done: storage.posix / storage.tars (".<name>.<random>.partial"), the
# demo simulator (".<name>.partial"), the integrity repair ("<name>.repair-<id>",
# integrity.repair_temp_path), rsync/wget-style
# ".part" and ".tmp".
TEMPORARY_SUFFIXES = (".partial", ".tmp", ".part")
TEMPORARY_FRAGMENTS = (REPAIR_TEMP_MARKER,)
# In a PROCESSING location: run directories ({root}/pipelines/{pipeline}/{sub group}/{run}-
# {attempt}, see ExecutedReductionStep) and staging tars (staging/{job id}/{package}.tar).
WORKSPACE_PREFIX = "pipelines/"
STAGING_PREFIX = "staging/"
# Copies the audit may mark MISSING when their file is absent. Deletion states are excluded: the
# file going away is what they are for.
LOSABLE = (_S.PRESENT, _S.STAGED)
# Lost paths named in a report (the count is always complete): a location that lost everything
# must not make the report as large as the location.
LOST_PATHS_KEPT = 100
# Longest relative path a DarkFile row can hold.
_MAX_PATH = DarkFile._meta.get_field("relative_path").max_length or 1000


class AuditOrderError(RuntimeError):
    """The listing or the database query is not in code-point order, so they cannot be merged
    (a storage backend or database collation that sorts differently). Raised before the chunk in
    which it is noticed is written; earlier chunks were correct."""


@dataclass
class AuditReport:
    """What one audit found. Counts of listed files: ``files_seen`` = ``known`` + ``dark_new``
    + ``dark_still_present`` + the four ``skipped_*``. Counts of copies: ``lost_marked`` (absent
    twice, marked MISSING), ``lost_reappeared`` (absent from the listing, there on the re-check),
    ``absent_not_marked`` (absent, but in a state the audit never marks). ``dark_gone``: dark
    file rows removed because the file is no longer dark. ``lost_paths``: the first
    ``LOST_PATHS_KEPT`` paths of the copies marked lost."""

    location: str
    started_at: datetime
    finished_at: datetime | None = None
    files_seen: int = 0
    bytes_seen: int = 0
    known: int = 0
    dark_new: int = 0
    dark_still_present: int = 0
    dark_bytes: int = 0
    dark_gone: int = 0
    lost_marked: int = 0
    lost_reappeared: int = 0
    absent_not_marked: int = 0
    skipped_new: int = 0
    skipped_temporary: int = 0
    skipped_workspace: int = 0
    skipped_unrecordable: int = 0
    chunks: int = 0
    lost_paths: list[str] = field(default_factory=list)

    @property
    def dark(self) -> int:
        return self.dark_new + self.dark_still_present

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO 8601)."""
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        data["dark"] = self.dark
        return data

    def summary(self) -> str:
        skipped = (
            self.skipped_new
            + self.skipped_temporary
            + self.skipped_workspace
            + self.skipped_unrecordable
        )
        return (
            f"{self.location}: {self.files_seen} file(s) seen, {self.known} known, "
            f"{self.dark} dark ({self.dark_new} new), {self.dark_gone} no longer dark, "
            f"{self.lost_marked} lost copy(ies) marked missing, {skipped} skipped"
        )


@dataclass(frozen=True)
class _Copy:
    relative_path: str
    pk: int
    status: str
    integrity: str
    checksum_verified_at: datetime | None
    created_at: datetime


def audit_storage(
    location: DataLocation,
    *,
    progress: Callable[[AuditReport], None] | None = None,
    chunk_size: int = AUDIT_CHUNK_SIZE,
    actor: str = "storage-audit",
    storage: Storage | None = None,
) -> AuditReport:
    """Audit ``location`` (see the module docstring) and return what was found. ``progress`` is
    called with the report so far after every chunk. ``storage`` replaces ``storage_for
    (location)`` (tests wrap it). Raises ``StorageUnavailable`` / ``NonRetryableError`` when
    the storage cannot be listed (chunks already compared stay recorded: each write is an
    upsert or a re-checked mark, so a repeated audit continues correctly) and
    ``AuditOrderError`` (see there). Safe to run twice, also concurrently."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    # T0 first: everything modified or registered after it belongs to a live operation.
    started = timezone.now()
    report = AuditReport(location=str(location), started_at=started)
    storage = storage or storage_for(location)
    audit = _Audit(location, storage, report, actor=actor, chunk_size=chunk_size)
    listing = _ordered(storage.list_entries(), "the storage listing")
    while chunk := list(islice(listing, chunk_size)):
        audit.chunk(chunk)
        if progress is not None:
            progress(report)
    audit.finish()
    if progress is not None:
        progress(report)
    log.info("storage audit %s", report.summary())
    return report


class _Audit:
    """The merge of one listing with the database, chunk by chunk."""

    def __init__(
        self,
        location: DataLocation,
        storage: Storage,
        report: AuditReport,
        *,
        actor: str,
        chunk_size: int,
    ) -> None:
        self.location = location
        self.chunk_size = chunk_size
        self.storage = storage
        self.report = report
        self.actor = actor
        self.started = report.started_at
        self.processing = location.location_type == LT.PROCESSING
        self.live_staging = self._live_staging_jobs() if self.processing else frozenset()
        self.copies = _Peekable(_live_copies_in_path_order(location, chunk_size))

    def _live_staging_jobs(self) -> frozenset[str]:
        """Ids (as path components) of the staging jobs still writing to this location."""
        ids = StagingJob.objects.filter(
            destination_location=self.location,
            status__in=(Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS),
        ).values_list("pk", flat=True)
        return frozenset(str(pk) for pk in ids)

    # -- one chunk ------------------------------------------------------------------------------
    def chunk(self, entries: list[StoredObject]) -> None:
        report = self.report
        report.chunks += 1
        dark: list[StoredObject] = []
        touched: list[str] = []  # skipped as new: keep a dark file's row alive
        absent: list[_Copy] = []
        for entry in entries:
            report.files_seen += 1
            report.bytes_seen += entry.size
            path = entry.relative_path
            # Copies before this file in the order were not listed. Checked a chunk at a time,
            # so a location that lost most of its files still needs no list of them all.
            while before := self.copies.take_before(path, limit=self.chunk_size):
                absent += before
                if len(absent) >= self.chunk_size:
                    self._check_absent(absent)
                    absent = []
            if self.copies.take_equal(path):
                report.known += 1
                continue
            reason = self._skip_reason(entry)
            if reason is None:
                dark.append(entry)
            else:
                setattr(report, reason, getattr(report, reason) + 1)
                if reason == "skipped_new":
                    touched.append(entry.relative_path)
        self._record_dark(dark, touched)
        self._check_absent(absent)

    def _skip_reason(self, entry: StoredObject) -> str | None:
        path = entry.relative_path
        if entry.modified_at > self.started:
            return "skipped_new"
        name = path.rsplit("/", 1)[-1]
        if name.endswith(TEMPORARY_SUFFIXES) or any(f in name for f in TEMPORARY_FRAGMENTS):
            return "skipped_temporary"
        if self.processing:
            if path.startswith(WORKSPACE_PREFIX):
                return "skipped_workspace"
            if path.startswith(STAGING_PREFIX):
                job = path[len(STAGING_PREFIX) :].split("/", 1)[0]
                if job in self.live_staging:
                    return "skipped_temporary"
        if len(path) > _MAX_PATH or not _is_utf8(path):
            log.warning(
                "storage audit %s: cannot record %r as a dark file (path too long or not UTF-8)",
                self.report.location,
                path,
            )
            return "skipped_unrecordable"
        return None

    def _record_dark(self, dark: list[StoredObject], touched: list[str]) -> None:
        """Upsert the chunk's dark files: one query to tell new from known ones, one upsert
        (first_seen_at only set on insert), and one to keep the rows of recorded dark files
        that were skipped as modified after the start."""
        here = DarkFile.objects.filter(location=self.location)
        if touched:
            here.filter(relative_path__in=touched).update(last_seen_at=self.started)
        if not dark:
            return
        paths = [entry.relative_path for entry in dark]
        known = set(here.filter(relative_path__in=paths).values_list("relative_path", flat=True))
        DarkFile.objects.bulk_create(
            [
                DarkFile(
                    location=self.location,
                    relative_path=entry.relative_path,
                    size_bytes=entry.size,
                    first_seen_at=self.started,
                    last_seen_at=self.started,
                )
                for entry in dark
            ],
            update_conflicts=True,
            unique_fields=["location", "relative_path"],
            update_fields=["size_bytes", "last_seen_at"],
        )
        self.report.dark_still_present += len(known)
        self.report.dark_new += len(dark) - len(known)
        self.report.dark_bytes += sum(entry.size for entry in dark)

    # -- copies the listing did not contain --------------------------------------------------------
    def _check_absent(self, absent: list[_Copy]) -> None:
        for row in absent:
            if (
                row.status not in LOSABLE
                or row.integrity == PhysicalCopy.Integrity.MISSING
                or row.created_at >= self.started
            ):
                self.report.absent_not_marked += 1
                continue
            self._recheck(row)

    def _recheck(self, row: _Copy) -> None:
        """Look the one file up again before calling it lost: the listing went past it some time
        ago, and a write or rename since may have put it there."""
        from .integrity import copy_mark_damaged

        if self.storage.exists(row.relative_path):
            self.report.lost_reappeared += 1
            return
        copy = PhysicalCopy.objects.get(pk=row.pk)
        marked = copy_mark_damaged(
            copy,
            PhysicalCopy.Integrity.MISSING,
            actor=self.actor,
            reason=(
                f"storage audit of {self.report.location} started "
                f"{self.started:%Y-%m-%d %H:%M:%S} UTC: {row.relative_path} is not on storage "
                "(absent from the listing and from a second look)"
            ),
            seen=(row.integrity, row.checksum_verified_at),
        )
        if marked:
            self.report.lost_marked += 1
            if len(self.report.lost_paths) < LOST_PATHS_KEPT:
                self.report.lost_paths.append(row.relative_path)
        else:
            # Deleted, being deleted or re-verified meanwhile: a newer fact stands.
            self.report.absent_not_marked += 1

    # -- the end ----------------------------------------------------------------------------------
    def finish(self) -> None:
        """Copies after the last listed file are absent too; then drop the dark-file rows of
        files not seen this time (gone, or now accounted for by a copy)."""
        while True:
            rest = self.copies.take_before(None, limit=self.chunk_size)
            if not rest:
                break
            self._check_absent(rest)
        self._drop_registered_meanwhile()
        gone, _ = DarkFile.objects.filter(
            location=self.location, last_seen_at__lt=self.started
        ).delete()
        self.report.dark_gone += gone
        self.report.finished_at = timezone.now()

    def _drop_registered_meanwhile(self) -> None:
        """A file whose copy was registered after the copies were queried looked dark to this
        audit; it is not. One query for the copies created since the start (few: the ingest and
        writes of the audit's own duration), then their dark-file rows go."""
        paths = (
            PhysicalCopy.objects.filter(location=self.location, created_at__gte=self.started)
            .exclude(status=_S.DELETED)
            .values_list("relative_path", flat=True)
            .iterator(chunk_size=self.chunk_size)
        )
        while batch := list(islice(paths, self.chunk_size)):
            rows = DarkFile.objects.filter(location=self.location, relative_path__in=batch)
            # Recorded by this audit: never dark. Recorded earlier: dark no longer.
            fresh, _ = rows.filter(first_seen_at=self.started).delete()
            older, _ = rows.delete()
            self.report.dark_new -= fresh
            self.report.dark_still_present -= older
            self.report.dark_gone += older


def _live_copies_in_path_order(location: DataLocation, chunk_size: int) -> Iterator[_Copy]:
    """The location's copies that are not DELETED, in code-point order of their relative path
    (the listing's order), streamed: a server-side cursor on PostgreSQL (``COLLATE "C"``
    compares UTF-8 bytes, which is code-point order), chunked fetches on SQLite (its default
    BINARY collation is the same order)."""
    collation = "C" if connection.vendor == "postgresql" else "BINARY"
    rows = (
        PhysicalCopy.objects.filter(location=location)
        .exclude(status=_S.DELETED)
        .annotate(ordered_path=Collate("relative_path", collation))
        .order_by("ordered_path", "pk")
        .values_list(
            "relative_path", "pk", "status", "integrity", "checksum_verified_at", "created_at"
        )
    )
    copies = (_Copy(*row) for row in rows.iterator(chunk_size=chunk_size))
    return _ordered(copies, "the database's copies", key=lambda c: c.relative_path)


def _ordered(items: Iterator[Any], what: str, key: Callable[[Any], str] | None = None) -> Any:
    """``items`` unchanged, raising ``AuditOrderError`` at the first one out of order."""
    previous: str | None = None
    for item in items:
        path = key(item) if key else item.relative_path
        if previous is not None and path < previous:
            raise AuditOrderError(
                f"{what} is not in code-point order ({path!r} after {previous!r}); "
                "the audit cannot merge it"
            )
        previous = path
        yield item


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a POSIX name (surrogate escapes)
        return False
    return True


class _Peekable:
    """An iterator of copies whose head can be looked at before it is taken."""

    _END = object()

    def __init__(self, items: Iterator[_Copy]) -> None:
        self._items = items
        self._head: Any = next(items, self._END)

    def take_before(self, path: str | None, *, limit: int) -> list[_Copy]:
        """Up to ``limit`` copies from the front whose path sorts before ``path`` (None: any)."""
        taken: list[_Copy] = []
        while len(taken) < limit and self._head is not self._END:
            if path is not None and self._head.relative_path >= path:
                break
            taken.append(self._head)
            self._head = next(self._items, self._END)
        return taken

    def take_equal(self, path: str) -> list[_Copy]:
        """Every copy at the front whose path is ``path`` (several kinds may share one)."""
        taken: list[_Copy] = []
        while self._head is not self._END and self._head.relative_path == path:
            taken.append(self._head)
            self._head = next(self._items, self._END)
        return taken


# Locations with at most this many live copies and recorded dark files are audited at once when
# an operator asks from the admin; larger ones go to a worker (a web request must stay short).
AUDIT_INLINE_MAX_COPIES = 5000


def location_audit_request(
    location: DataLocation, *, actor: str, inline_max: int = AUDIT_INLINE_MAX_COPIES
) -> AuditReport | None:
    """An operator's "audit now": audit ``location`` in this process and return the report when
    the database knows of at most ``inline_max`` files there (live copies plus recorded dark
    files), else send ``pipelines.tasks.audit_storage_location`` to the location's
    integrity_check queue (after the current transaction commits, on the workers that reach its
    storage) and return None. Raises what ``audit_storage`` raises for an inline audit."""
    from django.db import transaction

    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import audit_storage_location

    known = (
        PhysicalCopy.objects.filter(location=location).exclude(status=_S.DELETED).count()
        + DarkFile.objects.filter(location=location).count()
    )
    if known <= inline_max:
        return audit_storage(location, actor=actor)
    queue = queue_name(location, OperationType.INTEGRITY_CHECK)
    transaction.on_commit(
        lambda: audit_storage_location.apply_async(args=(location.pk,), queue=queue)
    )
    log.info("storage audit of %s queued on %s by %s", location, queue, actor)
    return None
