"""The deletion rules (see ``pipelines.services.deletion``): judging copies, one at a time or
a chunk at a time with a fixed number of queries per chunk, and saying why in words."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db.models import F, Q
from django.utils import timezone

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
    Status,
)
from pipelines.models.workflow import ACTIVE_RUN_STATUSES

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
class CopyRow:
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
    def from_values(cls, values: tuple[Any, ...]) -> CopyRow:
        return cls(*values)


def copy_rows(queryset: Any) -> list[CopyRow]:
    return [CopyRow.from_values(v) for v in queryset.values_list(*_ROW_FIELDS)]


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


class Judge:
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
    def load(self, rows: list[CopyRow]) -> _Context:
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
            from pipelines.services.transfers import arrivals_to_send_on

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

    def judge(self, rows: list[CopyRow]) -> list[Verdict]:
        if not rows:
            return []
        ctx = self.load(rows)
        return [self.verdict(row, ctx) for row in rows]

    # -- the rules ----------------------------------------------------------------------------
    def verdict(self, row: CopyRow, ctx: _Context) -> Verdict:
        loc = self.locations[row.location_id]
        keep = self._first_keeping_rule(row, loc, ctx)
        if keep is not None:
            return keep
        return Verdict(True, "deletable", self._why_deletable(row, loc, ctx))

    def _packages_of(self, row: CopyRow, ctx: _Context) -> list[_Package]:
        if row.kind == KIND.RAW_DATA_PACKAGE:
            pkg = ctx.packages.get(row.raw_data_package_id or 0)
            return [pkg] if pkg else []
        if row.kind == KIND.RAW_DATA_FILE:
            pkg = ctx.packages.get(row.file_package_id or 0)
            return [pkg] if pkg else []
        return [ctx.packages[p] for p in ctx.members.get(row.data_transfer_package_id or 0, [])]

    def _first_keeping_rule(self, row: CopyRow, loc: DataLocation, ctx: _Context) -> Verdict | None:
        is_bundle = row.kind == KIND.DATA_TRANSFER_PACKAGE
        if loc.location_type == LT.LONG_TERM_ARCHIVE and not is_bundle:
            return Verdict(
                False,
                "long_term_archive",
                f"long-term archive copies are never deleted by policy ({location_label(loc)})",
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
                f"its package {packages[0].name} still has a copy at {location_label(loc)}; the "
                "file copies there become deletion-possible once that copy is deleted",
            )
        return self._retention_rule(loc, packages)

    def _status_rule(self, row: CopyRow, ctx: _Context) -> Verdict | None:
        allowed: tuple[str, ...] = CANDIDATE_STATES
        if self.for_task is not None:
            # The worker judges its own copy before the decision (scheduled) and once more
            # right before removing the file (in progress).
            allowed = (*CANDIDATE_STATES, CS.DELETION_SCHEDULED, CS.DELETION_IN_PROGRESS)
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
        self, row: CopyRow, loc: DataLocation, ctx: _Context, packages: list[_Package]
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

    def _bundle_done_rule(self, row: CopyRow, ctx: _Context) -> Verdict | None:
        bundle_id = row.data_transfer_package_id or 0
        transfers = ctx.transfers.get(bundle_id, [])
        for t in transfers:
            if not _arrived_and_unpacked(t):
                dest = self.locations[t["destination_location_id"]]
                step = "arrived" if t["status"] != Status.COMPLETED else "been unpacked"
                return Verdict(
                    False,
                    "not_archived",
                    f"bundle transfer {t['id']} to {location_label(dest)} has not {step} yet",
                )
        if not any(t["is_primary"] for t in transfers):
            return Verdict(
                False,
                "not_archived",
                "the bundle has not left its observatory (no completed primary transfer)",
            )
        return None

    def _archive_copies_rule(
        self, row: CopyRow, loc: DataLocation, ctx: _Context, packages: list[_Package]
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
        where = f"the copy at {location_label(loc)}"
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
        self, row: CopyRow, loc: DataLocation, ctx: _Context, packages: list[_Package]
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
                            f"package {pkg.name} is still to be archived in "
                            f"{location_label(archive)} from here"
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
                f"retention of {_duration(loc.retention_period)} at {location_label(loc)} runs "
                f"until {_when(until)}",
            )
        return None

    def _why_deletable(self, row: CopyRow, loc: DataLocation, ctx: _Context) -> str:
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


def location_label(loc: DataLocation) -> str:
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
    judge = Judge(now or timezone.now(), for_task=for_task)
    rows = copy_rows(PhysicalCopy.objects.filter(pk=copy.pk))
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
