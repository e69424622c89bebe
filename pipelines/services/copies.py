"""Registering what is where: a verified PhysicalCopy after a write that was read back."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from pipelines.models import DataLocation, PhysicalCopy, PhysicalCopyStatus

from .states import record_creation

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
        PhysicalCopy.objects.filter(pk=existing.pk).update(
            integrity=PhysicalCopy.Integrity.VERIFIED,
            verified_checksum=checksum,
            checksum_verified_at=now,
            updated_at=now,
        )
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
