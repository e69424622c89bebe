"""Packaging: raw files of a finished scan become tar packages in the observatory buffer.

Two steps, both safe to repeat:

1. ``raw_data_packages_plan`` (manager tick, database only): the unpackaged files of finished
   scans, grouped by (scan, instrument module, source location), are assigned to new pending
   RawDataPackage rows of at most ``RAW_DATA_PACKAGE_MAX_BYTES``.
2. ``raw_data_package_build`` (worker, one package): tars the files with their relative paths,
   verifying each file against its registered checksum while it is read and checksumming the
   tar while it is written, into the highest-priority active BUFFER of the source's site; then,
   in one transaction, completes the row and registers the buffer copy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Min, QuerySet
from django.utils import timezone

from pipelines.exceptions import NonRetryableError, StorageUnavailable
from pipelines.faults import pause_point
from pipelines.models import (
    DataLocation,
    ExecutedObsUnit,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
)
from pipelines.storage.paths import safe_join
from pipelines.storage.tars import Member, MemberCorrupt, write_tar

from .copies import copy_register_verified
from .operations import (
    LeaseKeeper,
    operation_claim_batch,
    operation_complete,
    operation_dispatch,
    operation_fail,
    operation_start,
)
from .states import connection_supports_skip_locked, record_creation

log = logging.getLogger(__name__)

ObsStatus = ExecutedObsUnit.ObsStatus
# Files of these scans are packaged: the scan will write nothing more. A FAILED scan's files are
# known bad and stay out of the archive.
PACKAGEABLE_SCAN_STATUSES = (ObsStatus.COMPLETED, ObsStatus.ABORTED)
PACKAGE_DIR = "raw_data_packages"
LT = DataLocation.LocationType


# A raw file no longer matches the checksum registered at ingest (it rotted or was overwritten):
# not retryable, the same bytes would be read again.
SourceFileCorrupt = MemberCorrupt


def get_unpackaged_raw_data_files(
    source_location: DataLocation | None = None,
) -> QuerySet[RawDataFile]:
    """Files not yet in any package (of any scan), optionally at one source location. Served by
    the partial index ``raw_data_file_unpackaged_idx``."""
    files = RawDataFile.objects.filter(raw_data_package__isnull=True)
    if source_location is not None:
        files = files.filter(source_location=source_location)
    return files


@dataclass(frozen=True)
class PlanResult:
    packages: int
    files: int
    groups: int

    def summary(self) -> str:
        return (
            f"{self.packages} package(s) planned for {self.files} file(s) in {self.groups} group(s)"
        )


def raw_data_packages_plan(
    *, max_groups: int = 200, max_bytes: int | None = None, actor: str = "packaging-manager"
) -> PlanResult:
    """Assign the unpackaged files of up to ``max_groups`` (scan, module, source location)
    groups of finished scans to new pending packages, each at most ``max_bytes`` (default
    ``RAW_DATA_PACKAGE_MAX_BYTES``; a single larger file gets a package of its own, logged).
    Files are taken in relative-path order, so a split is reproducible. One transaction per
    group; a group another planner took meanwhile (its files no longer unpackaged) is skipped.
    """
    limit = max_bytes or settings.RAW_DATA_PACKAGE_MAX_BYTES
    groups = list(
        get_unpackaged_raw_data_files()
        .filter(executed_obs_unit__status__in=PACKAGEABLE_SCAN_STATUSES)
        .values("executed_obs_unit_id", "instrument_module_id", "source_location_id")
        .annotate(first=Min("created_at"))
        .order_by("first")[:max_groups]
    )
    packages = files = 0
    for group in groups:
        made, taken = _plan_group(
            group["executed_obs_unit_id"],
            group["instrument_module_id"],
            group["source_location_id"],
            limit=limit,
            actor=actor,
        )
        packages += made
        files += taken
    return PlanResult(packages=packages, files=files, groups=len(groups))


def _plan_group(
    scan_id: Any, module_id: int, source_id: int, *, limit: int, actor: str
) -> tuple[int, int]:
    try:
        with transaction.atomic():
            # One planner per scan at a time (ingest also locks the scan to add files): a second
            # planner skips the scan instead of splitting the group with the first.
            scans = ExecutedObsUnit.objects.filter(pk=scan_id)
            if connection_supports_skip_locked(scans.db):
                scans = scans.select_for_update(skip_locked=True)
            if not list(scans.values_list("pk", flat=True)):
                return 0, 0
            rows = get_unpackaged_raw_data_files().filter(
                executed_obs_unit_id=scan_id,
                instrument_module_id=module_id,
                source_location_id=source_id,
            )
            members = list(rows.order_by("relative_path").values_list("pk", "size", "name"))
            if not members:
                return 0, 0
            existing = RawDataPackage.objects.filter(
                executed_obs_unit_id=scan_id, instrument_module_id=module_id
            ).aggregate(n=Count("pk"))["n"]
            made = 0
            for index, chunk in enumerate(_split(members, limit), start=existing + 1):
                package = _new_package(scan_id, module_id, index, chunk, actor=actor)
                updated = RawDataFile.objects.filter(
                    pk__in=[pk for pk, _size, _name in chunk], raw_data_package__isnull=True
                ).update(raw_data_package=package, updated_at=timezone.now())
                if updated != len(chunk):
                    # Another planner took some of these files between our read and this write
                    # (SQLite has no row locks): give the whole group up; the next tick replans.
                    raise _GroupTaken
                made += 1
            return made, len(members)
    except (_GroupTaken, IntegrityError) as exc:
        log.info("packaging group %s/%s left for the next tick: %r", scan_id, module_id, exc)
        return 0, 0


class _GroupTaken(Exception):
    pass


def _split(members: list[tuple[Any, int, str]], limit: int) -> Iterator[list[tuple[Any, int, str]]]:
    chunk: list[tuple[Any, int, str]] = []
    total = 0
    for member in members:
        size = member[1]
        if chunk and total + size > limit:
            yield chunk
            chunk, total = [], 0
        if size > limit:
            log.warning(
                "raw file %s (%d bytes) is larger than RAW_DATA_PACKAGE_MAX_BYTES (%d); it gets "
                "a package of its own",
                member[2],
                size,
                limit,
            )
        chunk.append(member)
        total += size
    if chunk:
        yield chunk


def _new_package(
    scan_id: Any, module_id: int, index: int, chunk: list[tuple[Any, int, str]], *, actor: str
) -> RawDataPackage:
    scan = ExecutedObsUnit.objects.select_related("obs_unit").get(pk=scan_id)
    module_name = RawDataFile.objects.filter(pk=chunk[0][0]).values_list(
        "instrument_module__name", flat=True
    )[0]
    module_slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", module_name).strip("-") or "module"
    name = f"{scan.start_time:%Y%m%dT%H%M%S}_{str(scan.pk)[:8]}_{module_slug}_{index:03d}.tar"
    package = RawDataPackage.objects.create(
        name=name,
        relative_path=f"{PACKAGE_DIR}/{scan.start_time:%Y/%m/%d}/{name}",
        executed_obs_unit_id=scan_id,
        instrument_module_id=module_id,
        size=sum(size for _pk, size, _name in chunk),
        file_count=len(chunk),
        checksum_algorithm=settings.DEFAULT_CHECKSUM_ALGORITHM,
    )
    record_creation(package, actor=actor, reason=f"planned with {len(chunk)} file(s)")
    return package


def package_buffer(source: DataLocation) -> DataLocation:
    """The highest-priority active BUFFER of ``source``'s site that accepts writes (ties: lowest
    id): a buffer the disk monitor found full is passed over like an inactive one (behaviour 10).
    Raises ``StorageUnavailable`` when the site has none (retryable: an operator may activate
    one, or the disk monitor reopen one once deletions freed it)."""
    buffer = (
        DataLocation.objects.filter(
            site_id=source.site_id, location_type=LT.BUFFER, active=True, accepting_writes=True
        )
        .order_by("-priority", "pk")
        .first()
    )
    if buffer is None:
        raise StorageUnavailable(
            f"site {source.site} has no active BUFFER location accepting writes for packages"
        )
    return buffer


def package_source_location(package_id: int) -> DataLocation:
    """The SOURCE location the package's files were registered at (one per package)."""
    source_id = (
        RawDataFile.objects.filter(raw_data_package_id=package_id)
        .values_list("source_location_id", flat=True)
        .first()
    )
    if source_id is None:
        raise NonRetryableError(f"raw data package {package_id} has no files")
    return DataLocation.objects.select_related("site").get(pk=source_id)


def raw_data_package_build(
    package_id: int, *, token: str, owner: str, lease_seconds: int | None = None
) -> RawDataPackage:
    """Build one claimed package (see the module docstring). Raises ``ClaimLost`` when the claim
    no longer holds the row (nothing is written), ``SourceFileCorrupt`` for a file that does not
    match its registered checksum or size, ``StorageUnavailable``/``OSError`` for storage
    trouble; in every failure no partial tar is left behind. Returns the completed package."""
    package = RawDataPackage.objects.get(pk=package_id)
    package = operation_start(package, token=token, owner=owner, lease_seconds=lease_seconds)
    source = package_source_location(package.pk)
    buffer = package_buffer(source)
    for location in (source, buffer):
        if location.storage_type != DataLocation.StorageType.DISK:
            raise NonRetryableError(
                f"{location} is {location.storage_type} storage; packaging reads and writes disk"
            )
    target = safe_join(buffer.root_path, package.relative_path)
    algorithm = package.checksum_algorithm
    with LeaseKeeper(
        RawDataPackage, package.pk, token=token, lease_seconds=lease_seconds
    ) as keeper:
        checksum, size = _write_tar(package, source, target, algorithm, keeper, token)
    with transaction.atomic():
        package = operation_complete(
            package,
            token=token,
            actor=f"worker:{owner}",
            reason=f"tar written to {buffer} ({size} bytes)",
            updates={
                "size": size,
                "checksum": checksum,
                "origin_location": buffer,
                "idempotency_key": f"raw_data_package:{package.pk}:{checksum}",
            },
        )
        copy_register_verified(
            package,
            kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
            location=buffer,
            relative_path=package.relative_path,
            checksum=checksum,
            actor=f"worker:{owner}",
            reason="package tar written and hashed",
        )
    return package


def _write_tar(
    package: RawDataPackage,
    source: DataLocation,
    target: Path,
    algorithm: str,
    keeper: LeaseKeeper,
    token: str,
) -> tuple[str, int]:
    """The package's tar at ``target``: (checksum, size) as written (``write_tar``)."""
    files = (
        RawDataFile.objects.filter(raw_data_package=package)
        .order_by("relative_path")
        .only("pk", "relative_path", "size", "checksum", "checksum_algorithm")
    )
    members = (
        Member(
            arcname=f.relative_path,
            path=safe_join(source.root_path, f.relative_path),
            size=f.size,
            checksum=f.checksum,
            algorithm=f.checksum_algorithm,
            what=f"raw file at {source}:",
        )
        for f in files
    )
    return write_tar(
        target,
        members,
        algorithm=algorithm,
        claim=token,
        check=keeper.check,
        after_first=lambda: pause_point("packaging.mid_tar"),
    )


def packaging_manager_tick(*, owner: str, limit: int = 500) -> dict[str, int]:
    """One manager tick: plan new packages, claim up to ``limit`` pending ones and enqueue one
    build task per claimed row on the raw_data_package_creation queue of its source location,
    after the claim committed. Returns counts for the log and the runner."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import build_raw_data_package

    planned = raw_data_packages_plan()
    claim = operation_claim_batch(RawDataPackage, owner=owner, limit=limit)
    sources = dict(
        RawDataFile.objects.filter(raw_data_package_id__in=claim.ids)
        .values("raw_data_package_id")
        .annotate(source=Min("source_location_id"))
        .values_list("raw_data_package_id", "source")
    )
    locations = DataLocation.objects.select_related("site").in_bulk(set(sources.values()))
    queues: dict[int, str] = {}
    for pk in claim.ids:
        location = locations.get(sources.get(pk, -1))
        try:
            if location is None:
                raise NonRetryableError(f"raw data package {pk} has no files")
            queues[pk] = queue_name(location, OperationType.RAW_DATA_PACKAGE_CREATION)
        except (NonRetryableError, ValueError) as exc:
            operation_fail(
                RawDataPackage,
                pk,
                token=claim.token,
                message=f"cannot dispatch: {exc}",
                actor=f"manager:{owner}",
                retryable=False,
            )
    operation_dispatch(build_raw_data_package, claim.token, queues)
    return {"planned": planned.packages, "claimed": len(claim.ids), "dispatched": len(queues)}
