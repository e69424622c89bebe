"""Registering what is where (a verified PhysicalCopy after a write that was read back) and the
lock every move that reduces an object's good copies takes first."""

from __future__ import annotations

from typing import Any, TypeVar

from django.db import models, transaction
from django.utils import timezone

from pipelines.models import (
    DataLocation,
    DataProduct,
    DataTransferPackage,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
    RawDataPackage,
)

from .states import record_creation, transition

_KIND_FIELD: dict[str, str] = {
    PhysicalCopy.Kind.RAW_DATA_FILE: "raw_data_file",
    PhysicalCopy.Kind.RAW_DATA_PACKAGE: "raw_data_package",
    PhysicalCopy.Kind.DATA_TRANSFER_PACKAGE: "data_transfer_package",
    PhysicalCopy.Kind.DATA_PRODUCT: "data_product",
}


def copy_register_verified(
    obj: Any,
    *,
    kind: str,
    location: DataLocation,
    relative_path: str,
    checksum: str,
    actor: str,
    reason: str,
) -> PhysicalCopy:
    """The live copy of ``obj`` at ``location``, PRESENT and verified with ``checksum`` now.

    Creates it (with its creation event) or, when a live copy is already registered there (a
    repeated task, a re-copy), records the new verification on it. Call inside the transaction
    that completes the operation which wrote and read back the bytes."""
    field = _KIND_FIELD[kind]
    now = timezone.now()
    existing = (
        PhysicalCopy.objects.select_for_update()
        .filter(**{field: obj}, location=location)
        .exclude(status=PhysicalCopyStatus.DELETED)
        .first()
    )
    if existing is not None:
        fresh = {"verified_checksum": checksum, "checksum_verified_at": now, "updated_at": now}
        if existing.integrity != PhysicalCopy.Integrity.VERIFIED:
            # A re-copy over a damaged or unverified copy: the integrity move gets its event.
            return transition(
                existing,
                PhysicalCopy.Integrity.VERIFIED,
                field="integrity",
                actor=actor,
                reason=reason,
                updates=fresh,
            )
        PhysicalCopy.objects.filter(pk=existing.pk).update(**fresh)
        existing.refresh_from_db()
        return existing
    copy = PhysicalCopy.objects.create(
        kind=kind,
        **{field: obj},
        location=location,
        relative_path=relative_path,
        status=PhysicalCopyStatus.PRESENT,
        integrity=PhysicalCopy.Integrity.VERIFIED,
        verified_checksum=checksum,
        checksum_verified_at=now,
    )
    record_creation(copy, actor=actor, reason=reason)
    return copy


def copy_lock_object(copy: PhysicalCopy) -> models.Model:
    """Lock (``SELECT ... FOR UPDATE``) the row that serialises every change to the number of good
    copies of ``copy``'s object, and return it: the package for a package copy and for a copy of
    a file already in a package, otherwise the object itself (a bundle, a product, an unpackaged
    file).

    Every move that reduces an object's verified copies (deletion start, mismatch, missing, lost)
    takes this lock first and re-checks its rule in the same transaction, so two such moves on
    different copies of one object run one after the other and the second sees the first: no
    write skew can remove the last good copy. Must be called inside ``transaction.atomic()``."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("copy_lock_object() must run inside transaction.atomic()")
    if copy.kind == PhysicalCopy.Kind.RAW_DATA_PACKAGE:
        return RawDataPackage.objects.select_for_update().get(
            pk=_object_id(copy, copy.raw_data_package_id)
        )
    if copy.kind == PhysicalCopy.Kind.RAW_DATA_FILE:
        file_id = _object_id(copy, copy.raw_data_file_id)
        package_id = (
            RawDataFile.objects.filter(pk=file_id)
            .values_list("raw_data_package_id", flat=True)
            .get()
        )
        if package_id is not None:
            return RawDataPackage.objects.select_for_update().get(pk=package_id)
        return RawDataFile.objects.select_for_update().get(pk=file_id)
    if copy.kind == PhysicalCopy.Kind.DATA_TRANSFER_PACKAGE:
        return DataTransferPackage.objects.select_for_update().get(
            pk=_object_id(copy, copy.data_transfer_package_id)
        )
    return DataProduct.objects.select_for_update().get(pk=_object_id(copy, copy.data_product_id))


T = TypeVar("T")


def _object_id(copy: PhysicalCopy, value: T | None) -> T:
    # The check constraint guarantees the column its kind names is set; a copy built in memory
    # without it is a programming error, said in words rather than as a failed lookup.
    if value is None:
        raise ValueError(f"copy {copy.pk} of kind {copy.kind} does not name its object")
    return value
