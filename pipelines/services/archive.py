"""Long-term archive (seed 003): package tars from a site's buffer into its LONG_TERM_ARCHIVE
locations (POSIX or S3), read back and verified before the package is marked ARCHIVED.

``transfer_raw_data_packages_to_long_term_archive`` is the manager (plan, claim, dispatch);
``send_data_to_long_term_archive`` the worker's service for one LongTermArchiveTransfer.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from pipelines.exceptions import ChecksumMismatch
from pipelines.models import (
    DataLocation,
    LongTermArchiveTransfer,
    PackageState,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataPackage,
    Status,
)
from pipelines.storage.base import copy, storage_for

from .copies import copy_register_verified
from .operations import (
    LeaseKeeper,
    operation_claim_and_dispatch,
    operation_complete,
    operation_start,
)
from .states import ForbiddenTransition, TransitionConflict, record_creation, transition

log = logging.getLogger(__name__)
LT = DataLocation.LocationType


def long_term_archive_transfers_plan(
    *, site_name: str | None = None, limit: int = 500, actor: str = "archive-manager"
) -> int:
    """Create a pending archive transfer for every package that has a verified PRESENT copy in
    an active BUFFER of a site with an active LONG_TERM_ARCHIVE location accepting writes (the
    disk monitor clears that on a full one), and neither a live copy nor an archive transfer in
    flight there. Returns the transfers created."""
    archives = DataLocation.objects.filter(
        location_type=LT.LONG_TERM_ARCHIVE, active=True, accepting_writes=True
    )
    if site_name:
        archives = archives.filter(site__short_name=site_name)
    made = 0
    for archive in archives.order_by("pk"):
        in_buffers = (
            PhysicalCopy.objects.filter(
                kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
                status=PhysicalCopyStatus.PRESENT,
                integrity=PhysicalCopy.Integrity.VERIFIED,
                location__site_id=archive.site_id,
                location__location_type=LT.BUFFER,
                location__active=True,
            )
            .exclude(
                raw_data_package_id__in=LongTermArchiveTransfer.objects.filter(
                    destination_location=archive,
                    status__in=(Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS),
                ).values("raw_data_package_id")
            )
            .exclude(
                raw_data_package_id__in=PhysicalCopy.objects.filter(location=archive)
                .exclude(status=PhysicalCopyStatus.DELETED)
                .values("raw_data_package_id")
            )
            .order_by("created_at", "pk")[: max(limit - made, 0)]
        )
        for buffer_copy in in_buffers:
            try:
                with transaction.atomic():
                    row = LongTermArchiveTransfer.objects.create(
                        raw_data_package_id=buffer_copy.raw_data_package_id or 0,
                        origin_location_id=buffer_copy.location_id,
                        destination_location=archive,
                    )
                    record_creation(row, actor=actor, reason=f"archive into {archive}")
            except IntegrityError:
                continue  # another manager planned it first
            made += 1
    return made


def transfer_raw_data_packages_to_long_term_archive(
    verbose: bool = False, site_name: str | None = None, *, owner: str = "archive-manager"
) -> dict[str, int]:
    """The archive manager (seed 003): plan archive transfers, claim the pending ones, and send
    each to the long_term_archive_transfer queue of its archive location after the claim
    commits. Returns counts; ``verbose`` logs them."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import send_data_to_long_term_archive

    planned = long_term_archive_transfers_plan(site_name=site_name)
    candidates = LongTermArchiveTransfer.objects.due()
    if site_name:
        candidates = candidates.filter(destination_location__site__short_name=site_name)
    claimed = operation_claim_and_dispatch(
        LongTermArchiveTransfer,
        send_data_to_long_term_archive,
        owner=owner,
        queryset=candidates,
        select_related=("destination_location__site",),
        queue_of=lambda row: queue_name(
            row.destination_location, OperationType.LONG_TERM_ARCHIVE_TRANSFER
        ),
    )
    counts = {"planned": planned, "claimed": claimed}
    if verbose:
        log.info("long-term archive: %s", counts)
    return counts


def archive_manager_tick(*, owner: str) -> dict[str, int]:
    return transfer_raw_data_packages_to_long_term_archive(owner=owner)


def long_term_archive_transfer_run(
    transfer_id: int, *, token: str, owner: str, lease_seconds: int | None = None
) -> LongTermArchiveTransfer:
    """Copy one claimed package tar into its archive with the checksum computed while copying,
    read the archived bytes back, and only when they match the package's checksum register the
    verified archive copy, complete the transfer and mark the package ARCHIVED, in one
    transaction. A mismatch removes the archived object and raises ``ChecksumMismatch``."""
    row = LongTermArchiveTransfer.objects.select_related(
        "raw_data_package", "origin_location__site", "destination_location__site"
    ).get(pk=transfer_id)
    row = operation_start(row, token=token, owner=owner, lease_seconds=lease_seconds)
    package = row.raw_data_package
    source = storage_for(row.origin_location)
    archive = storage_for(row.destination_location)
    path = package.relative_path
    with LeaseKeeper(
        LongTermArchiveTransfer, row.pk, token=token, lease_seconds=lease_seconds
    ) as keeper:
        copy(source, path, archive, path, algorithm=package.checksum_algorithm)
        keeper.check()
        stored, size = archive.checksum(path, package.checksum_algorithm)
    if stored != package.checksum:
        archive.delete(path)
        raise ChecksumMismatch(
            f"package {package.name} in {archive.label} reads back as {stored[:16]}..., "
            f"registered {package.checksum[:16]}...; the archived object was removed"
        )
    actor = f"worker:{owner}"
    with transaction.atomic():
        row = operation_complete(
            row,
            token=token,
            actor=actor,
            reason=f"archived in {archive.label} and read back ({size} bytes)",
            updates={"idempotency_key": f"long_term_archive_transfer:{row.pk}:{stored}"},
        )
        copy_register_verified(
            package,
            kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
            location=row.destination_location,
            relative_path=path,
            checksum=stored,
            actor=actor,
            reason=f"archive transfer {row.pk}: copied and read back",
        )
        mark_archived(package, actor=actor, where=archive.label)
    return row


def mark_archived(package: RawDataPackage, *, actor: str, where: str) -> None:
    """ARCHIVED (with ``archived_at``) unless it already is; call inside the transaction that
    registers the verified archive copy. The package row is locked first."""
    locked: Any = RawDataPackage.objects.select_for_update().get(pk=package.pk)
    if locked.state == PackageState.ARCHIVED:
        return
    try:
        transition(
            locked,
            PackageState.ARCHIVED,
            field="state",
            actor=actor,
            reason=f"verified archive copy in {where}",
            updates={"archived_at": timezone.now()},
        )
    except (ForbiddenTransition, TransitionConflict) as exc:  # pragma: no cover - locked above
        log.warning("package %s not marked archived: %s", package.pk, exc)
        return
    # Trigger manager (issue 11): evaluate the pipelines at once when this commits, not at the
    # next tick (coalesced with other archivings; the periodic tick is the safety net).
    from .triggers import queue_trigger_evaluation

    queue_trigger_evaluation()
