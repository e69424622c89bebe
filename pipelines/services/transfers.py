"""Transfers between sites: bundling packages at the observatory, choosing a route, copying a
bundle along it, and unpacking it at the destination.

- ``data_transfer_packages_plan`` / ``data_transfer_package_build``: WAITING packages in an
  observatory buffer become a bundle (a tar of package tars), each TRANSFERRING.
- ``data_transfers_plan``: each built bundle leaves the observatory once, by the next primary
  route (round-robin, ``primary_route_next``); once unpacked at an archive site it goes on by
  every active secondary route to the sites it has not reached.
- ``data_transfer_copy``: the copy, hashed while copying, then read back at the destination.
- ``data_transfer_unpack``: the package tars out of the bundle, each verified, copies PRESENT.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import tarfile

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from pipelines.exceptions import ChecksumMismatch, NonRetryableError, StorageUnavailable
from pipelines.faults import pause_point
from pipelines.models import (
    DataLocation,
    DataTransfer,
    DataTransferPackage,
    DataTransferRoute,
    PackageState,
    PhysicalCopy,
    PrimaryTransferCursor,
    RawDataPackage,
    Status,
)
from pipelines.models.transfers import RouteType
from pipelines.storage.base import copy, storage_for
from pipelines.storage.paths import safe_join
from pipelines.storage.tars import Member, write_tar

from .archive import mark_archived
from .copies import copy_register_verified
from .operations import (
    LeaseKeeper,
    operation_claim_and_dispatch,
    operation_complete,
    operation_start,
)
from .states import connection_supports_skip_locked, record_creation, transition

log = logging.getLogger(__name__)
LT = DataLocation.LocationType


def primary_route_next(origin_site_id: int) -> DataTransferRoute:
    """The next active primary route out of ``origin_site_id`` in round-robin order (by
    priority, then id): three packages over two archive sites go A, B, A. The cursor row is
    locked until the caller's transaction ends, so call this in the transaction that creates
    the transfer: two managers at once then alternate instead of both taking A, and a rolled
    back transfer does not advance the cursor. Raises ``StorageUnavailable`` (retryable: an
    operator may activate one) when the site has no active primary route."""
    with transaction.atomic():
        PrimaryTransferCursor.objects.get_or_create(origin_site_id=origin_site_id)
        cursor = PrimaryTransferCursor.objects.select_for_update().get(pk=origin_site_id)
        routes = list(
            DataTransferRoute.objects.filter(
                origin_site_id=origin_site_id, is_primary=True, active=True
            ).order_by("-priority", "pk")
        )
        if not routes:
            raise StorageUnavailable(f"site {origin_site_id} has no active primary route")
        ids = [route.pk for route in routes]
        position = ids.index(cursor.last_route_id) + 1 if cursor.last_route_id in ids else 0
        route = routes[position % len(routes)]
        cursor.last_route = route
        cursor.save(update_fields=["last_route", "updated_at"])
    return route


# --- bundling ------------------------------------------------------------------------------------
BUNDLE_DIR = "data_transfer_packages"


def data_transfer_packages_plan(
    *, max_bundles: int = 50, max_bytes: int | None = None, actor: str = "bundling-manager"
) -> int:
    """Bundle WAITING packages whose tar is built in a buffer of a site with an active primary
    route (an observatory) into new pending DataTransferPackages of at most ``max_bytes``
    (default ``DATA_TRANSFER_PACKAGE_MAX_BYTES``), per buffer, oldest first; each package joins
    its bundle and becomes TRANSFERRING (behaviour 11). Returns the bundles created. Packages
    are locked with SKIP LOCKED, so two planners at once take disjoint packages."""
    limit = max_bytes or settings.DATA_TRANSFER_PACKAGE_MAX_BYTES
    observatories = DataTransferRoute.objects.filter(is_primary=True, active=True).values(
        "origin_site_id"
    )
    due = RawDataPackage.objects.filter(
        state=PackageState.WAITING,
        status=Status.COMPLETED,
        data_transfer_package__isnull=True,
        origin_location__site_id__in=observatories,
    )
    made = 0
    buffers = list(due.order_by().values_list("origin_location_id", flat=True).distinct())
    for buffer_id in buffers:
        while made < max_bundles and _plan_bundle(buffer_id, due, limit, actor):
            made += 1
    return made


def _plan_bundle(buffer_id: int, due: QuerySet[RawDataPackage], limit: int, actor: str) -> bool:
    with transaction.atomic():
        rows = due.filter(origin_location_id=buffer_id).order_by("created_at", "pk")
        if connection_supports_skip_locked(rows.db):
            rows = rows.select_for_update(skip_locked=True, of=("self",))
        chosen: list[RawDataPackage] = []
        total = 0
        for package in rows[:1000]:
            if chosen and total + package.size > limit:
                break
            chosen.append(package)
            total += package.size
        if not chosen:
            return False
        buffer = DataLocation.objects.get(pk=buffer_id)
        name = f"{timezone.now():%Y%m%dT%H%M%S}_{buffer.site_id}_{secrets.token_hex(4)}.tar"
        bundle = DataTransferPackage.objects.create(
            name=name,
            relative_path=f"{BUNDLE_DIR}/{name}",
            origin_location=buffer,
            size=total,
            checksum_algorithm=settings.DEFAULT_CHECKSUM_ALGORITHM,
        )
        record_creation(bundle, actor=actor, reason=f"bundle of {len(chosen)} package(s)")
        for package in chosen:
            RawDataPackage.objects.filter(pk=package.pk).update(data_transfer_package=bundle)
            transition(
                package,
                PackageState.TRANSFERRING,
                field="state",
                actor=actor,
                reason=f"joined transfer bundle {bundle.name}",
            )
    return True


def data_transfer_package_build(
    bundle_id: int, *, token: str, owner: str, lease_seconds: int | None = None
) -> DataTransferPackage:
    """Tar the package tars of one claimed bundle next to them in the buffer, each verified
    against its package checksum while read, the bundle hashed while written; register the
    bundle's copy. Raises ``ClaimLost`` (nothing written) or ``MemberCorrupt``."""
    bundle = DataTransferPackage.objects.select_related("origin_location").get(pk=bundle_id)
    bundle = operation_start(bundle, token=token, owner=owner, lease_seconds=lease_seconds)
    buffer = bundle.origin_location
    if buffer.storage_type != DataLocation.StorageType.DISK:
        raise NonRetryableError(f"{buffer} is {buffer.storage_type}; bundles are built on disk")
    packages = bundle.raw_data_packages.order_by("relative_path")
    members = (
        Member(
            arcname=p.relative_path,
            path=safe_join(buffer.root_path, p.relative_path),
            # Once built, a package's size column is its tar's size (packaging sets it).
            size=p.size,
            checksum=p.checksum,
            algorithm=p.checksum_algorithm,
            what=f"package at {buffer}:",
        )
        for p in packages
    )
    with LeaseKeeper(
        DataTransferPackage, bundle.pk, token=token, lease_seconds=lease_seconds
    ) as keeper:
        checksum, size = write_tar(
            safe_join(buffer.root_path, bundle.relative_path),
            members,
            algorithm=bundle.checksum_algorithm,
            claim=token,
            check=keeper.check,
        )
    with transaction.atomic():
        bundle = operation_complete(
            bundle,
            token=token,
            actor=f"worker:{owner}",
            reason=f"bundle written to {buffer} ({size} bytes)",
            updates={
                "size": size,
                "checksum": checksum,
                "idempotency_key": f"data_transfer_package:{bundle.pk}:{checksum}",
            },
        )
        copy_register_verified(
            bundle,
            kind=PhysicalCopy.Kind.DATA_TRANSFER_PACKAGE,
            location=buffer,
            relative_path=bundle.relative_path,
            checksum=checksum,
            actor=f"worker:{owner}",
            reason="bundle tar written and hashed",
        )
    return bundle


# --- transfers -----------------------------------------------------------------------------------
def data_transfers_plan(*, actor: str = "transfer-manager", limit: int = 200) -> int:
    """Create the transfers that are due: each built bundle at an observatory without a live
    primary transfer leaves once, by the next primary route (round-robin); each bundle that
    arrived and was unpacked at an archive site is sent on by every active secondary route to a
    site it has not reached. Returns the transfers created."""
    made = 0
    unsent = (
        DataTransferPackage.objects.filter(status=Status.COMPLETED)
        .exclude(
            pk__in=DataTransfer.objects.filter(is_primary=True, status__in=LIVE_TRANSFER).values(
                "data_transfer_package_id"
            )
        )
        .filter(
            origin_location__site_id__in=DataTransferRoute.objects.filter(
                is_primary=True, active=True
            ).values("origin_site_id")
        )
        .order_by("created_at", "pk")[:limit]
    )
    for bundle in unsent:
        made += _create_primary_transfer(bundle, actor)
    for transfer in arrivals_to_send_on().order_by("pk")[:limit]:
        made += _create_secondary_transfers(transfer, actor)
    return made


def arrivals_to_send_on() -> QuerySet[DataTransfer]:
    """Arrived and unpacked transfers from whose destination site an active secondary route
    leads to a site their bundle has not reached yet (no live transfer there, and not its
    origin). One query, so a tick never re-examines bundles that went everywhere long ago, and
    an old arrival whose onward copy failed is found again however many newer ones exist."""
    reached = DataTransfer.objects.filter(
        data_transfer_package=OuterRef(OuterRef("data_transfer_package")),
        status__in=LIVE_TRANSFER,
        destination_location__site=OuterRef("destination_site"),
    )
    open_routes = (
        DataTransferRoute.objects.filter(
            origin_site=OuterRef("destination_location__site"), is_primary=False, active=True
        )
        .exclude(destination_site=OuterRef("data_transfer_package__origin_location__site"))
        .exclude(Exists(reached))
    )
    return (
        DataTransfer.objects.filter(status=Status.COMPLETED, unpack_status=Status.COMPLETED)
        .filter(Exists(open_routes))
        .select_related("destination_location", "data_transfer_package__origin_location")
    )


LIVE_TRANSFER = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS, Status.COMPLETED)


def _create_primary_transfer(bundle: DataTransferPackage, actor: str) -> int:
    try:
        with transaction.atomic():
            route = primary_route_next(bundle.origin_location.site_id)
            destination = route_destination(route)
            transfer = DataTransfer.objects.create(
                data_transfer_package=bundle,
                origin_location=bundle.origin_location,
                destination_location=destination,
                route=route,
                method=route.method,
                is_primary=True,
            )
            record_creation(transfer, actor=actor, reason=f"primary by route {route.name}")
    except IntegrityError:
        return 0  # another manager created it first
    except StorageUnavailable as exc:
        log.warning("bundle %s cannot leave yet: %s", bundle.pk, exc)
        return 0
    return 1


def _create_secondary_transfers(arrived: DataTransfer, actor: str) -> int:
    here = arrived.destination_location
    bundle = arrived.data_transfer_package
    reached = set(
        DataTransfer.objects.filter(
            data_transfer_package=bundle, status__in=LIVE_TRANSFER
        ).values_list("destination_location__site_id", flat=True)
    ) | {bundle.origin_location.site_id}
    made = 0
    routes = DataTransferRoute.objects.filter(
        origin_site_id=here.site_id, is_primary=False, active=True
    ).exclude(destination_site_id__in=reached)
    for route in routes:
        try:
            with transaction.atomic():
                transfer = DataTransfer.objects.create(
                    data_transfer_package=bundle,
                    origin_location=here,
                    destination_location=route_destination(route),
                    route=route,
                    method=route.method,
                    is_primary=False,
                )
                record_creation(transfer, actor=actor, reason=f"secondary by route {route.name}")
        except IntegrityError:
            continue
        except StorageUnavailable as exc:
            log.warning("bundle %s cannot go on by %s yet: %s", bundle.pk, route.name, exc)
            continue
        made += 1
    return made


def route_destination(route: DataTransferRoute) -> DataLocation:
    """Where a route delivers: its explicit destination location (CUSTOM, or any route naming
    one), else the destination site's highest-priority active BUFFER, or for a DIRECT route
    (skip the destination buffer) its highest-priority active LONG_TERM_ARCHIVE; in both cases
    only locations accepting writes (the disk monitor clears that on a full one). Raises
    ``StorageUnavailable`` (retryable: the transfer is planned again next tick) when there is
    none, or when the explicit destination does not accept writes now."""
    if route.destination_location_id is not None:
        explicit: DataLocation = route.destination_location  # type: ignore[assignment]
        if not explicit.accepting_writes:
            raise StorageUnavailable(
                f"route {route.name}: {explicit} is not accepting writes (full); the transfer "
                "waits until the disk monitor reopens it"
            )
        return explicit
    kind = LT.LONG_TERM_ARCHIVE if route.route_type == RouteType.DIRECT else LT.BUFFER
    location = (
        DataLocation.objects.filter(
            site_id=route.destination_site_id,
            location_type=kind,
            active=True,
            accepting_writes=True,
        )
        .order_by("-priority", "pk")
        .first()
    )
    if location is None:
        raise StorageUnavailable(
            f"route {route.name}: site {route.destination_site_id} has no active {kind} "
            "location accepting writes"
        )
    return location


def data_transfer_copy(
    transfer_id: int, *, token: str, owner: str, lease_seconds: int | None = None
) -> DataTransfer:
    """Copy one claimed transfer's bundle to its destination with the checksum computed while
    copying, then read the stored bytes back and compare with the bundle's checksum; register
    the bundle's copy there. A mismatch deletes the bad copy and raises ``ChecksumMismatch``
    (retryable: the next attempt copies again)."""
    transfer = DataTransfer.objects.select_related(
        "data_transfer_package", "origin_location__site", "destination_location__site"
    ).get(pk=transfer_id)
    transfer = operation_start(transfer, token=token, owner=owner, lease_seconds=lease_seconds)
    bundle = transfer.data_transfer_package
    source = storage_for(transfer.origin_location)
    target = storage_for(transfer.destination_location)
    with LeaseKeeper(DataTransfer, transfer.pk, token=token, lease_seconds=lease_seconds) as keeper:
        copy(
            source,
            bundle.relative_path,
            target,
            bundle.relative_path,
            algorithm=bundle.checksum_algorithm,
        )
        pause_point("transfer.after_copy")
        keeper.check()
        stored, size = target.checksum(bundle.relative_path, bundle.checksum_algorithm)
    if stored != bundle.checksum:
        target.delete(bundle.relative_path)
        raise ChecksumMismatch(
            f"bundle {bundle.name} at {target.label} reads back as {stored[:16]}..., expected "
            f"{bundle.checksum[:16]}...; the copy was removed"
        )
    with transaction.atomic():
        transfer = operation_complete(
            transfer,
            token=token,
            actor=f"worker:{owner}",
            reason=f"copied to {target.label} and read back ({size} bytes)",
            updates={
                "bytes_transferred": size,
                "idempotency_key": f"data_transfer:{transfer.pk}:{stored}",
            },
        )
        copy_register_verified(
            bundle,
            kind=PhysicalCopy.Kind.DATA_TRANSFER_PACKAGE,
            location=transfer.destination_location,
            relative_path=bundle.relative_path,
            checksum=stored,
            actor=f"worker:{owner}",
            reason=f"transfer {transfer.pk}: copied and read back",
        )
    return transfer


def data_transfer_unpack(
    transfer_id: int, *, token: str, owner: str, lease_seconds: int | None = None
) -> DataTransfer:
    """Unpack one claimed, arrived bundle at its destination: each package tar in it is written
    to its own path with its checksum computed as it is written and compared with the package's
    registered checksum; only when every package matches are their copies registered PRESENT
    and the unpacking completed, in one transaction. A mismatch removes what was written, and
    raises ``ChecksumMismatch``: no PRESENT copy, the step fails (and is retried).

    At a long-term archive (a DIRECT route skipped the buffer) each package is also read back
    from the archive before its copy is registered, and the package becomes ARCHIVED, as an
    archive transfer would have made it."""
    transfer = DataTransfer.objects.select_related(
        "data_transfer_package", "destination_location__site"
    ).get(pk=transfer_id)
    transfer = operation_start(
        transfer, token=token, owner=owner, lease_seconds=lease_seconds, field="unpack_status"
    )
    bundle = transfer.data_transfer_package
    here = storage_for(transfer.destination_location)
    expected = {p.relative_path: p for p in bundle.raw_data_packages.all()}
    written: dict[int, tuple[str, str]] = {}
    at_archive = transfer.destination_location.location_type == LT.LONG_TERM_ARCHIVE
    try:
        with (
            LeaseKeeper(
                DataTransfer,
                transfer.pk,
                token=token,
                lease_seconds=lease_seconds,
                field="unpack_status",
            ) as keeper,
            here.get_stream(bundle.relative_path) as raw,
            tarfile.open(fileobj=raw, mode="r|") as tar,
        ):
            for member in tar:
                keeper.check()
                package = expected.get(member.name)
                if package is None or not member.isfile():
                    raise NonRetryableError(
                        f"bundle {bundle.name} holds {member.name!r}, which is not one of its "
                        "packages"
                    )
                reader = tar.extractfile(member)
                assert reader is not None
                checksum, _size = here.put_stream(
                    package.relative_path, reader, algorithm=package.checksum_algorithm
                )
                written[package.pk] = (package.relative_path, checksum)
                if at_archive and checksum == package.checksum:
                    checksum, _size = here.checksum(
                        package.relative_path, package.checksum_algorithm
                    )
                if checksum != package.checksum:
                    raise ChecksumMismatch(
                        f"package {package.name} unpacked at {here.label} hashes to "
                        f"{checksum[:16]}..., registered {package.checksum[:16]}..."
                    )
                pause_point("unpack.mid_bundle")
        missing = sorted(set(expected) - {path for path, _ in written.values()})
        if missing:
            raise ChecksumMismatch(f"bundle {bundle.name} lacks {', '.join(missing)}")
    except BaseException:
        for path, _checksum in written.values():
            with contextlib.suppress(Exception):
                here.delete(path)
        raise
    with transaction.atomic():
        transfer = operation_complete(
            transfer,
            token=token,
            actor=f"worker:{owner}",
            field="unpack_status",
            reason=f"{len(written)} package(s) unpacked and verified at {here.label}",
        )
        for path, checksum in written.values():
            copy_register_verified(
                expected[path],
                kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
                location=transfer.destination_location,
                relative_path=path,
                checksum=checksum,
                actor=f"worker:{owner}",
                reason=f"unpacked from bundle {bundle.name} (transfer {transfer.pk})",
            )
            if at_archive:
                mark_archived(expected[path], actor=f"worker:{owner}", where=here.label)
    return transfer


# --- manager ticks -------------------------------------------------------------------------------
def bundling_manager_tick(*, owner: str) -> dict[str, int]:
    """Plan bundles of WAITING packages at the observatories and dispatch their builds to the
    data_transfer_package_creation queue of the buffer."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import build_data_transfer_package

    planned = data_transfer_packages_plan()
    claimed = operation_claim_and_dispatch(
        DataTransferPackage,
        build_data_transfer_package,
        owner=owner,
        select_related=("origin_location__site",),
        queue_of=lambda row: queue_name(
            row.origin_location, OperationType.DATA_TRANSFER_PACKAGE_CREATION
        ),
    )
    return {"planned": planned, "claimed": claimed}


def transfer_manager_tick(*, owner: str) -> dict[str, int]:
    """Create due transfers (primary round-robin, secondary onward) and dispatch the copies to
    the data_transfer queue of their origin."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import transfer_data_transfer_package

    planned = data_transfers_plan()
    claimed = operation_claim_and_dispatch(
        DataTransfer,
        transfer_data_transfer_package,
        owner=owner,
        select_related=("origin_location__site",),
        queue_of=lambda row: queue_name(row.origin_location, OperationType.DATA_TRANSFER),
    )
    return {"planned": planned, "claimed": claimed}


def unpack_manager_tick(*, owner: str) -> dict[str, int]:
    """Dispatch the unpacking of arrived bundles to the data_transfer_unpacking queue of their
    destination."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import unpack_data_transfer

    claimed = operation_claim_and_dispatch(
        DataTransfer,
        unpack_data_transfer,
        owner=owner,
        field="unpack_status",
        select_related=("destination_location__site",),
        queue_of=lambda row: queue_name(
            row.destination_location, OperationType.DATA_TRANSFER_UNPACKING
        ),
    )
    return {"claimed": claimed}
