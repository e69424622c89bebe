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
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import DateTimeField, Exists, ExpressionWrapper, F, OuterRef, Q, Value
from django.utils import timezone

from pipelines.faults import pause_point
from pipelines.models import (
    CopyRepair,
    DataLocation,
    DataTransfer,
    DataTransferPackage,
    DeletionTask,
    ExecutedReductionStep,
    LongTermArchiveTransfer,
    PackageState,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataPackage,
    RunStatus,
    StagingJob,
    StateEvent,
    Status,
)
from pipelines.models.workflow import ACTIVE_RUN_STATUSES
from pipelines.storage.base import storage_for

from .copies import copy_lock_object
from .operations import operation_claim_and_dispatch, operation_complete, operation_start
from .states import TransitionConflict, record_creation, transition, transition_batch

log = logging.getLogger(__name__)

CS = PhysicalCopyStatus
LT = DataLocation.LocationType
KIND = PhysicalCopy.Kind
LIVE = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)
# States a copy may be scheduled for deletion from.
CANDIDATE_STATES = (CS.PRESENT, CS.STAGED, CS.DELETION_POSSIBLE, CS.DELETION_FAILED)
# A copy whose deletion failed (and whose task gave up) is tried again after this long.
RETRY_FAILED_AFTER = timedelta(minutes=15)
# Copies judged per batch of rule queries: bounds memory and the size of IN (...) lists.
CHUNK = 2000
# Copies scheduled per manager tick, and per locking transaction within it.
TICK_LIMIT = 500
LOCK_BATCH = 100


@dataclass(frozen=True)
class Verdict:
    """Whether a copy may be deleted now: ``rule`` is the first rule that keeps it
    (``deletable`` False) or ``"deletable"``; ``reason`` says it in words for people."""

    deletable: bool
    rule: str
    reason: str


@dataclass(frozen=True)
class PlanEntry:
    """One copy of a deletion plan and its verdict."""

    copy_id: int
    location: str
    kind: str
    object_name: str
    relative_path: str
    status: str
    verdict: Verdict

    def as_dict(self) -> dict[str, Any]:
        return {
            "copy": self.copy_id,
            "location": self.location,
            "kind": self.kind,
            "object": self.object_name,
            "path": self.relative_path,
            "status": self.status,
            "delete": self.verdict.deletable,
            "rule": self.verdict.rule,
            "reason": self.verdict.reason,
        }


# --- judging copies in batches -------------------------------------------------------------------
_ROW_FIELDS = (
    "id",
    "kind",
    "location_id",
    "status",
    "relative_path",
    "updated_at",
    "raw_data_package_id",
    "raw_data_file_id",
    "raw_data_file__raw_data_package_id",
    "data_transfer_package_id",
    "data_product_id",
)


@dataclass
class _Row:
    id: int
    kind: str
    location_id: int
    status: str
    relative_path: str
    updated_at: datetime
    raw_data_package_id: int | None
    raw_data_file_id: Any
    file_package_id: int | None
    data_transfer_package_id: int | None
    data_product_id: int | None

    @classmethod
    def from_values(cls, values: tuple[Any, ...]) -> _Row:
        return cls(*values)


def _rows(queryset: Any) -> list[_Row]:
    return [_Row.from_values(v) for v in queryset.values_list(*_ROW_FIELDS)]


@dataclass
class _Package:
    id: int
    name: str
    state: str
    archived_at: datetime | None
    bundle_id: int | None
    origin_min: int


@dataclass
class _ArchiveCopy:
    id: int
    location_id: int
    status: str
    integrity: str
    verified_at: datetime | None


@dataclass
class _Context:
    """Everything the rules need about one chunk of copies, loaded with one query per table."""

    packages: dict[int, _Package] = field(default_factory=dict)
    members: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    bundles: dict[int, dict[str, Any]] = field(default_factory=dict)
    archive_copies: dict[int, list[_ArchiveCopy]] = field(default_factory=lambda: defaultdict(list))
    staging: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    runs: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    transfers: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    archive_transfers: dict[int, list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    onward: set[tuple[int, int]] = field(default_factory=set)
    package_copies_here: set[tuple[int, int]] = field(default_factory=set)


class _Judge:
    """Judges copies against the rules (module docstring) for one moment ``now``.

    ``judge(rows)`` loads the context of a chunk with a fixed number of queries, whatever its
    size; the location table is read once per judge. ``for_task``: the worker's re-check of the
    copy its own task scheduled, where DELETION_SCHEDULED is the expected state and that task
    does not count as another live deletion."""

    def __init__(self, now: datetime, *, for_task: int | None = None) -> None:
        self.now = now
        self.for_task = for_task
        self.locations: dict[int, DataLocation] = {
            loc.pk: loc for loc in DataLocation.objects.select_related("site")
        }
        self.archives_by_site: dict[int, list[DataLocation]] = defaultdict(list)
        for loc in self.locations.values():
            if loc.location_type == LT.LONG_TERM_ARCHIVE and loc.active:
                self.archives_by_site[loc.site_id].append(loc)
        # Live repairs and live deletion tasks are few (bounded by what the managers claim),
        # so they are read once per judge rather than once per chunk.
        self.repairs_by_package: dict[int, int] = {}
        self.repairs_by_bundle: dict[int, int] = {}
        self.repairs_by_copy: dict[int, int] = {}
        for rid, copy_id, source_id, pkg_id, file_pkg, bundle in CopyRepair.objects.filter(
            status__in=LIVE
        ).values_list(
            "id",
            "physical_copy_id",
            "source_copy_id",
            "physical_copy__raw_data_package_id",
            "physical_copy__raw_data_file__raw_data_package_id",
            "physical_copy__data_transfer_package_id",
        ):
            for package_id in (pkg_id, file_pkg):
                if package_id:
                    self.repairs_by_package[package_id] = rid
            if bundle:
                self.repairs_by_bundle[bundle] = rid
            self.repairs_by_copy[copy_id] = rid
            if source_id:
                self.repairs_by_copy[source_id] = rid
        tasks = DeletionTask.objects.filter(status__in=LIVE)
        if for_task is not None:
            tasks = tasks.exclude(pk=for_task)
        self.live_tasks: dict[int, int] = dict(tasks.values_list("physical_copy_id", "id"))

    # -- loading ----------------------------------------------------------------------------
    def load(self, rows: list[_Row]) -> _Context:
        ctx = _Context()
        direct = {r.raw_data_package_id for r in rows if r.raw_data_package_id}
        direct |= {r.file_package_id for r in rows if r.file_package_id}
        bundle_ids = {r.data_transfer_package_id for r in rows if r.data_transfer_package_id}
        if direct or bundle_ids:
            for p in RawDataPackage.objects.filter(
                Q(pk__in=direct) | Q(data_transfer_package_id__in=bundle_ids)
            ).values(
                "id",
                "name",
                "state",
                "archived_at",
                "data_transfer_package_id",
                "origin_location__site__min_archive_copies",
            ):
                pkg = _Package(
                    p["id"],
                    p["name"],
                    p["state"],
                    p["archived_at"],
                    p["data_transfer_package_id"],
                    p["origin_location__site__min_archive_copies"] or 1,
                )
                ctx.packages[pkg.id] = pkg
                if pkg.bundle_id in bundle_ids:
                    ctx.members[pkg.bundle_id].append(pkg.id)
        package_ids = list(ctx.packages)
        bundle_ids |= {p.bundle_id for p in ctx.packages.values() if p.bundle_id}
        if bundle_ids:
            ctx.bundles = {
                b["id"]: dict(b)
                for b in DataTransferPackage.objects.filter(pk__in=bundle_ids).values(
                    "id", "name", "status", "origin_location_id"
                )
            }
            for t in (
                DataTransfer.objects.filter(data_transfer_package_id__in=bundle_ids)
                .exclude(status=Status.FAILED)
                .values(
                    "id",
                    "data_transfer_package_id",
                    "origin_location_id",
                    "destination_location_id",
                    "status",
                    "unpack_status",
                    "is_primary",
                )
            ):
                ctx.transfers[t["data_transfer_package_id"]].append(dict(t))
            from .transfers import arrivals_to_send_on

            ctx.onward = set(
                arrivals_to_send_on()
                .filter(data_transfer_package_id__in=bundle_ids)
                .values_list("data_transfer_package_id", "destination_location_id")
            )
        if package_ids:
            for c in (
                PhysicalCopy.objects.filter(
                    kind=KIND.RAW_DATA_PACKAGE,
                    raw_data_package_id__in=package_ids,
                    location__location_type=LT.LONG_TERM_ARCHIVE,
                )
                .exclude(status=CS.DELETED)
                .values_list(
                    "id",
                    "raw_data_package_id",
                    "location_id",
                    "status",
                    "integrity",
                    "checksum_verified_at",
                )
            ):
                ctx.archive_copies[c[1]].append(_ArchiveCopy(c[0], c[2], c[3], c[4], c[5]))
            through = StagingJob.raw_data_packages.through
            for s in (
                through.objects.filter(rawdatapackage_id__in=package_ids)
                .filter(Q(stagingjob__active=True) | Q(stagingjob__status__in=LIVE))
                .values(
                    "rawdatapackage_id",
                    "stagingjob_id",
                    "stagingjob__active",
                    "stagingjob__status",
                    "stagingjob__origin_location_id",
                    "stagingjob__destination_location_id",
                )
            ):
                ctx.staging[s["rawdatapackage_id"]].append(dict(s))
            runs = ExecutedReductionStep.input_raw_packages.through
            run_field = "executedreductionstep"
            for package_id, run_id in (
                runs.objects.filter(rawdatapackage_id__in=package_ids)
                .filter(
                    Q(**{f"{run_field}__status__in": [s.value for s in ACTIVE_RUN_STATUSES]})
                    | Q(
                        **{
                            f"{run_field}__status": RunStatus.FAILED,
                            f"{run_field}__retry_count__lt": F(f"{run_field}__max_retries"),
                        }
                    )
                )
                .values_list("rawdatapackage_id", f"{run_field}_id")
            ):
                ctx.runs[package_id].append(run_id)
            for a in LongTermArchiveTransfer.objects.filter(
                raw_data_package_id__in=package_ids, status__in=LIVE
            ).values("id", "raw_data_package_id", "origin_location_id", "destination_location_id"):
                ctx.archive_transfers[a["raw_data_package_id"]].append(dict(a))
            file_rows = [r for r in rows if r.kind == KIND.RAW_DATA_FILE and r.file_package_id]
            if file_rows:
                ctx.package_copies_here = set(
                    PhysicalCopy.objects.filter(
                        kind=KIND.RAW_DATA_PACKAGE,
                        raw_data_package_id__in={r.file_package_id for r in file_rows},
                        location_id__in={r.location_id for r in file_rows},
                    )
                    .exclude(status=CS.DELETED)
                    .values_list("raw_data_package_id", "location_id")
                )
        return ctx

    def judge(self, rows: list[_Row]) -> list[Verdict]:
        if not rows:
            return []
        ctx = self.load(rows)
        return [self.verdict(row, ctx) for row in rows]

    # -- the rules ----------------------------------------------------------------------------
    def verdict(self, row: _Row, ctx: _Context) -> Verdict:
        loc = self.locations[row.location_id]
        keep = self._first_keeping_rule(row, loc, ctx)
        if keep is not None:
            return keep
        return Verdict(True, "deletable", self._why_deletable(row, loc, ctx))

    def _packages_of(self, row: _Row, ctx: _Context) -> list[_Package]:
        if row.kind == KIND.RAW_DATA_PACKAGE:
            pkg = ctx.packages.get(row.raw_data_package_id or 0)
            return [pkg] if pkg else []
        if row.kind == KIND.RAW_DATA_FILE:
            pkg = ctx.packages.get(row.file_package_id or 0)
            return [pkg] if pkg else []
        return [ctx.packages[p] for p in ctx.members.get(row.data_transfer_package_id or 0, [])]

    def _first_keeping_rule(self, row: _Row, loc: DataLocation, ctx: _Context) -> Verdict | None:
        is_bundle = row.kind == KIND.DATA_TRANSFER_PACKAGE
        if loc.location_type == LT.LONG_TERM_ARCHIVE and not is_bundle:
            return Verdict(
                False,
                "long_term_archive",
                f"long-term archive copies are never deleted by policy ({_label(loc)})",
            )
        if row.kind == KIND.DATA_PRODUCT:
            return Verdict(False, "data_product", "data product copies have no deletion policy")
        status_keep = self._status_rule(row, ctx)
        if status_keep is not None:
            return status_keep
        packages = self._packages_of(row, ctx)
        for rule in (self._archived_rule, self._archive_copies_rule, self._in_use_rule):
            found = rule(row, loc, ctx, packages)
            if found is not None:
                return found
        if (
            row.kind == KIND.RAW_DATA_FILE
            and (row.file_package_id, row.location_id) in ctx.package_copies_here
        ):
            return Verdict(
                False,
                "package_copy_here",
                f"its package {packages[0].name} still has a copy at {_label(loc)}; the file "
                "copies there become deletion-possible once that copy is deleted",
            )
        return self._retention_rule(loc, packages)

    def _status_rule(self, row: _Row, ctx: _Context) -> Verdict | None:
        allowed: tuple[str, ...] = CANDIDATE_STATES
        if self.for_task is not None:
            allowed = (*CANDIDATE_STATES, CS.DELETION_SCHEDULED)
        if row.status not in allowed:
            return Verdict(
                False,
                "status",
                f"the copy is {CS(row.status).label.lower()}, not a deletion candidate",
            )
        task = self.live_tasks.get(row.id)
        if task is not None:
            return Verdict(False, "status", f"deletion task {task} for it is already live")
        if (
            self.for_task is None
            and row.status == CS.DELETION_FAILED
            and row.updated_at > self.now - RETRY_FAILED_AFTER
        ):
            retry_at = row.updated_at + RETRY_FAILED_AFTER
            return Verdict(
                False,
                "status",
                f"its deletion failed at {_when(row.updated_at)}; it is tried again after "
                f"{_when(retry_at)}",
            )
        return None

    def _archived_rule(
        self, row: _Row, loc: DataLocation, ctx: _Context, packages: list[_Package]
    ) -> Verdict | None:
        if row.kind == KIND.RAW_DATA_FILE and row.file_package_id is None:
            return Verdict(False, "not_archived", "the file is not in a package yet")
        if not packages:
            return Verdict(False, "not_archived", "the bundle lists no packages")
        for pkg in packages:
            if pkg.state != PackageState.ARCHIVED:
                return Verdict(
                    False,
                    "not_archived",
                    f"package {pkg.name} is {PackageState(pkg.state).label.lower()}, not archived",
                )
        if row.kind == KIND.DATA_TRANSFER_PACKAGE:
            return self._bundle_done_rule(row, ctx)
        return None

    def _bundle_done_rule(self, row: _Row, ctx: _Context) -> Verdict | None:
        bundle_id = row.data_transfer_package_id or 0
        transfers = ctx.transfers.get(bundle_id, [])
        for t in transfers:
            if not _arrived_and_unpacked(t):
                dest = self.locations[t["destination_location_id"]]
                step = "arrived" if t["status"] != Status.COMPLETED else "been unpacked"
                return Verdict(
                    False,
                    "not_archived",
                    f"bundle transfer {t['id']} to {_label(dest)} has not {step} yet",
                )
        if not any(t["is_primary"] for t in transfers):
            return Verdict(
                False,
                "not_archived",
                "the bundle has not left its observatory (no completed primary transfer)",
            )
        return None

    def _archive_copies_rule(
        self, row: _Row, loc: DataLocation, ctx: _Context, packages: list[_Package]
    ) -> Verdict | None:
        for pkg in packages:
            required = max(loc.site.min_archive_copies, pkg.origin_min)
            copies = [c for c in ctx.archive_copies.get(pkg.id, []) if c.id != row.id]
            good = [c for c in copies if self._verified(c)]
            if len(good) >= required:
                continue
            weak = [self._why_not_counted(c) for c in copies if c not in good]
            detail = f"; {'; '.join(weak)}" if weak else ""
            return Verdict(
                False,
                "archive_copies",
                f"only {len(good)} of {required} required verified archive copies of package "
                f"{pkg.name}{detail}",
            )
        return None

    def _verified(self, c: _ArchiveCopy) -> bool:
        if c.status != CS.PRESENT or c.integrity != PhysicalCopy.Integrity.VERIFIED:
            return False
        if c.verified_at is None:
            return False
        return self.now - c.verified_at <= self.locations[c.location_id].verification_interval

    def _why_not_counted(self, c: _ArchiveCopy) -> str:
        loc = self.locations[c.location_id]
        where = f"the copy at {_label(loc)}"
        if c.status != CS.PRESENT:
            return f"{where} is {CS(c.status).label.lower()}"
        if c.integrity != PhysicalCopy.Integrity.VERIFIED:
            label = PhysicalCopy.Integrity(c.integrity).label.lower()
            return f"{where} is not verified ({label})"
        if c.verified_at is None:
            return f"{where} was never verified"
        return (
            f"{where} was verified {_duration(self.now - c.verified_at)} ago, older than "
            f"{_duration(loc.verification_interval)}"
        )

    def _in_use_rule(
        self, row: _Row, loc: DataLocation, ctx: _Context, packages: list[_Package]
    ) -> Verdict | None:
        here = row.location_id

        def used(why: str) -> Verdict:
            return Verdict(False, "in_use", why)

        if row.id in self.repairs_by_copy:
            return used(f"copy repair {self.repairs_by_copy[row.id]} uses this copy")
        if row.data_transfer_package_id in self.repairs_by_bundle:
            return used(
                f"copy repair {self.repairs_by_bundle[row.data_transfer_package_id]} of this "
                "bundle is live"
            )
        for pkg in packages:
            if pkg.id in self.repairs_by_package:
                return used(
                    f"copy repair {self.repairs_by_package[pkg.id]} of package {pkg.name} is live"
                )
            for s in ctx.staging.get(pkg.id, []):
                if s["stagingjob__active"] and s["stagingjob__destination_location_id"] == here:
                    return used(f"active staging job {s['stagingjob_id']} holds {pkg.name} here")
                if s["stagingjob__status"] in LIVE and here in (
                    s["stagingjob__origin_location_id"],
                    s["stagingjob__destination_location_id"],
                ):
                    return used(f"staging job {s['stagingjob_id']} is staging {pkg.name}")
            if ctx.runs.get(pkg.id):
                return used(f"run {ctx.runs[pkg.id][0]} has package {pkg.name} as input")
            for a in ctx.archive_transfers.get(pkg.id, []):
                if here in (a["origin_location_id"], a["destination_location_id"]):
                    return used(f"archive transfer {a['id']} of {pkg.name} is live")
            if row.kind == KIND.RAW_DATA_PACKAGE and pkg.bundle_id in ctx.bundles:
                bundle = ctx.bundles[pkg.bundle_id]
                if bundle["status"] in LIVE and bundle["origin_location_id"] == here:
                    return used(f"bundle {bundle['name']} is being built from it")
                for t in ctx.transfers.get(pkg.bundle_id, []):
                    ends = (t["origin_location_id"], t["destination_location_id"])
                    if not _arrived_and_unpacked(t) and here in ends:
                        return used(f"transfer {t['id']} of bundle {bundle['name']} is live")
            if row.kind == KIND.RAW_DATA_PACKAGE and loc.location_type == LT.BUFFER:
                held = {c.location_id for c in ctx.archive_copies.get(pkg.id, []) if c.id != row.id}
                for archive in self.archives_by_site.get(loc.site_id, []):
                    if archive.pk not in held:
                        return used(
                            f"package {pkg.name} is still to be archived in {_label(archive)} "
                            "from here"
                        )
        if row.kind == KIND.DATA_TRANSFER_PACKAGE:
            if (row.data_transfer_package_id, here) in ctx.onward:
                return used("a secondary route still has to send the bundle on from here")
            for t in ctx.transfers.get(row.data_transfer_package_id or 0, []):
                if t["status"] in LIVE and here in (
                    t["origin_location_id"],
                    t["destination_location_id"],
                ):
                    return used(f"transfer {t['id']} of the bundle is live")
        return None

    def _retention_rule(self, loc: DataLocation, packages: list[_Package]) -> Verdict | None:
        archived = [p.archived_at for p in packages if p.archived_at is not None]
        if not archived:
            return Verdict(False, "retention", "no archive time recorded for its package")
        until = max(archived) + loc.retention_period
        if self.now < until:
            return Verdict(
                False,
                "retention",
                f"retention of {_duration(loc.retention_period)} at {_label(loc)} runs until "
                f"{_when(until)}",
            )
        return None

    def _why_deletable(self, row: _Row, loc: DataLocation, ctx: _Context) -> str:
        packages = self._packages_of(row, ctx)
        counts = []
        for pkg in packages:
            required = max(loc.site.min_archive_copies, pkg.origin_min)
            copies = [c for c in ctx.archive_copies.get(pkg.id, []) if c.id != row.id]
            good = sum(1 for c in copies if self._verified(c))
            counts.append((good, required))
        good = min(g for g, _ in counts)
        required = max(r for _, r in counts)
        place = _PLACE[loc.location_type]
        whats: dict[str, str] = {
            KIND.RAW_DATA_FILE: f"{place} file copy",
            KIND.RAW_DATA_PACKAGE: f"{place} package copy",
            KIND.DATA_TRANSFER_PACKAGE: "bundle tar, every transfer unpacked",
        }
        what = whats[row.kind]
        name = packages[0].name if len(packages) == 1 else f"{len(packages)} packages"
        return (
            f"{what}: {name} archived, {good} verified archive "
            f"{'copy' if good == 1 else 'copies'} ({required} required), retention of "
            f"{_duration(loc.retention_period)} passed"
        )


# How a verdict names a location's type (the choice labels are longer).
_PLACE: dict[str, str] = {
    LT.SOURCE: "source",
    LT.BUFFER: "buffer",
    LT.LONG_TERM_ARCHIVE: "long-term archive",
    LT.PROCESSING: "processing",
}


def _arrived_and_unpacked(transfer: dict[str, Any]) -> bool:
    return bool(
        transfer["status"] == Status.COMPLETED and transfer["unpack_status"] == Status.COMPLETED
    )


def _label(loc: DataLocation) -> str:
    return f"{loc.site.short_name}:{loc.name}"


def _when(moment: datetime) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")


def _duration(delta: timedelta) -> str:
    """'40 days', '1 day', '6 hours', '15 minutes', '0 days': the largest whole unit."""
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if (seconds >= size and seconds % size == 0) or seconds >= size * 2:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'}"
    if seconds <= 0:
        return "0 days"
    return f"{seconds} second{'' if seconds == 1 else 's'}"


# --- public: one copy ----------------------------------------------------------------------------
def deletion_verdict(
    copy: PhysicalCopy, *, now: datetime | None = None, for_task: int | None = None
) -> Verdict:
    """The verdict on one copy now (module docstring): the first rule that keeps it, or why it
    may go. Reads the copy's current row, so a stale instance is judged as it is stored.
    ``for_task``: judge it as the worker of that deletion task does (its scheduled state and
    its own task do not keep it)."""
    judge = _Judge(now or timezone.now(), for_task=for_task)
    rows = _rows(PhysicalCopy.objects.filter(pk=copy.pk))
    if not rows:
        raise PhysicalCopy.DoesNotExist(f"physical copy {copy.pk} does not exist")
    return judge.judge(rows)[0]


def copy_deletion_blocker(copy: PhysicalCopy) -> str:
    """One sentence for people on whether ``copy`` may be deleted now and why (``manage.py why``
    and the admin change page), e.g. "not deletable: only 1 of 2 required verified archive
    copies of package p.tar; the copy at cologne:lta was verified 40 days ago, older than 30
    days"."""
    verdict = deletion_verdict(copy)
    return f"{'deletable' if verdict.deletable else 'not deletable'}: {verdict.reason}"


# --- public: the plan ----------------------------------------------------------------------------
def _locations_in_order(location: DataLocation | None) -> list[DataLocation]:
    """Locations under disk pressure (not accepting writes) first, then the others."""
    locations = DataLocation.objects.select_related("site").order_by(
        "accepting_writes", "site__short_name", "name"
    )
    if location is not None:
        locations = locations.filter(pk=location.pk)
    return list(locations)


def _chunks(queryset: Any, size: int = CHUNK) -> Iterator[list[_Row]]:
    """``queryset`` in pages of ``size`` rows by ascending id (keyset pagination: each page is
    one indexed query, memory stays bounded however many rows there are)."""
    last = 0
    while True:
        rows = _rows(queryset.filter(pk__gt=last).order_by("pk")[:size])
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
    judge = _Judge(now)
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
                    location=_label(loc),
                    kind=row.kind,
                    object_name=names.get(row.id, row.relative_path),
                    relative_path=row.relative_path,
                    status=row.status,
                    verdict=verdict,
                )


def _object_names(rows: list[_Row]) -> dict[int, str]:
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
    judge = _Judge(now)
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


def _schedule(rows: list[_Row], *, now: datetime, actor: str) -> int:
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
        fresh = _rows(PhysicalCopy.objects.filter(pk__in=[c.pk for c in copies]).order_by("pk"))
        judged = dict(zip([r.id for r in fresh], _Judge(now).judge(fresh), strict=True))
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
    not counted as a good copy by anyone. Then the file or object is removed
    (``Storage.delete``, idempotent) and, in a second transaction, the copy becomes DELETED with
    ``deleted_at``, a package copy's file copies at that location become DELETION_POSSIBLE
    (behaviour 17), and the task completes.

    A copy found DELETION_IN_PROGRESS (a worker died between the decision and the end) is
    finished without judging again: the decision stands and its file may already be gone. A
    failing delete moves the copy to DELETION_FAILED with ``last_error`` and re-raises, so the
    task base class retries or fails the task; the retry moves the copy back through
    DELETION_SCHEDULED. Raises ``ClaimLost`` when the claim no longer holds the task."""
    task = DeletionTask.objects.select_related("physical_copy__location__site").get(pk=task_id)
    task = operation_start(task, token=token, owner=owner)
    copy = task.physical_copy
    actor = f"worker:{owner}"
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
    try:
        storage_for(copy.location).delete(copy.relative_path)
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
    with transaction.atomic():
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
            reason=f"deleted {copy.relative_path} at {_label(copy.location)}",
            updates={"idempotency_key": f"deletion_task:{task.pk}:deleted"},
        )


def _already_gone(copy: PhysicalCopy) -> bool:
    """A copy whose earlier deletion attempt failed may have lost its file anyway (the attempt
    died after removing it): then it must not be withdrawn as PRESENT."""
    if copy.status != CS.DELETION_FAILED:
        return False
    return not storage_for(copy.location).exists(copy.relative_path)


def _withdraw(
    task: DeletionTask, copy: PhysicalCopy, verdict: Verdict, *, token: str, actor: str
) -> DeletionTask:
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
