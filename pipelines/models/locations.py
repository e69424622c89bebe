"""Sites, storage locations and physical copies (ops-db §3)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, ClassVar

from django.core.exceptions import ValidationError
from django.db import models

from .base import StatefulModel, TimeStamped, choices_check

# Site short names and location names become parts of Celery queue names.
_QUEUE_PART = re.compile(r"^[a-z][a-z0-9_]*$")


def validate_queue_part(value: str) -> None:
    if not _QUEUE_PART.match(value or ""):
        raise ValidationError(
            f"{value!r} must start with a lowercase letter and contain only a-z, 0-9 and _ "
            "(it becomes part of a queue name)."
        )


class Site(TimeStamped):
    name = models.CharField(max_length=200, unique=True)
    short_name = models.CharField(max_length=50, unique=True, validators=[validate_queue_part])
    location = models.CharField(
        max_length=200, blank=True, default="", help_text='geographic description, e.g. "Atacama"'
    )
    # Sites whose deletion policy needs two verified archive copies before anything goes.
    min_archive_copies = models.PositiveSmallIntegerField(default=1)

    class Meta:
        db_table = "site"
        ordering = ["short_name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(short_name__regex=r"^[a-z][a-z0-9_]*$"),
                name="site_short_name_queue_safe",
                violation_error_message=(
                    "The short name must start with a lowercase letter and contain only "
                    "a-z, 0-9 and _ (it becomes part of queue names)."
                ),
            ),
            models.CheckConstraint(
                condition=models.Q(min_archive_copies__gte=1),
                name="site_min_archive_copies_positive",
                violation_error_message=(
                    "A site needs at least one archive copy before data may be deleted."
                ),
            ),
        ]

    def __str__(self) -> str:
        return self.short_name

    # Queue names are {site}_{location}_{operation} and every part may contain "_", so a new
    # short name can spell another site's queues (pipelines.queues explains the rule). Checked
    # in save() too, because the demo loader, factories and services save without full_clean().
    def clean(self) -> None:
        super().clean()
        _refuse_queue_clashes(self, "short_name")

    def save(self, *args: Any, **kwargs: Any) -> None:
        update_fields = kwargs.get("update_fields")
        if update_fields is None or "short_name" in update_fields:
            _refuse_queue_clashes(self, "short_name")
        super().save(*args, **kwargs)


def _refuse_queue_clashes(instance: Site | DataLocation, field: str) -> None:
    """Raise ValidationError on ``field`` if ``instance`` would own a queue name that another
    location already owns. Imported late: pipelines.queues imports these models."""
    from pipelines.queues import describe_clashes, location_queue_clashes, site_queue_clashes

    if isinstance(instance, Site):
        clashes = site_queue_clashes(instance)
    else:
        clashes = location_queue_clashes(instance)
    if clashes:
        raise ValidationError({field: describe_clashes(clashes)})


class LocationType(models.TextChoices):
    SOURCE = "source", "Source (instrument computer)"
    BUFFER = "buffer", "Buffer"
    LONG_TERM_ARCHIVE = "long_term_archive", "Long-term archive"
    PROCESSING = "processing", "Processing"


class StorageType(models.TextChoices):
    DISK = "disk", "Disk"
    S3 = "s3", "S3 object store"
    TAPE = "tape", "Tape"


class ChecksumAlgorithm(models.TextChoices):
    SHA256 = "sha256", "SHA-256"
    XXH3_128 = "xxh3_128", "xxh3-128 (fast)"


class DataLocation(TimeStamped):
    LocationType = LocationType

    StorageType = StorageType

    ChecksumAlgorithm = ChecksumAlgorithm

    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="locations")
    name = models.CharField(max_length=50, validators=[validate_queue_part])
    location_type = models.CharField(max_length=20, choices=LocationType.choices)
    storage_type = models.CharField(
        max_length=8, choices=StorageType.choices, default=StorageType.DISK
    )
    # Higher wins: the manager writes to the highest-priority active location of a kind.
    priority = models.IntegerField(default=0)
    active = models.BooleanField(default=True)
    # Disk: host (empty = reachable from this worker) and root path.
    host = models.CharField(max_length=200, blank=True, default="")
    root_path = models.CharField(max_length=1000, blank=True, default="")
    # S3: the bucket and where it lives. Credentials never live here: they come from the
    # environment (see pipelines.storage.s3).
    s3_endpoint_url = models.CharField(max_length=500, blank=True, default="")
    s3_bucket = models.CharField(max_length=200, blank=True, default="")
    s3_region = models.CharField(max_length=50, blank=True, default="")
    s3_prefix = models.CharField(max_length=500, blank=True, default="")
    checksum_algorithm = models.CharField(
        max_length=16, choices=ChecksumAlgorithm.choices, default=ChecksumAlgorithm.SHA256
    )
    # Disk monitor: above the high-water mark new packages avoid this location; above the
    # cleanup mark deletion is prioritised here.
    capacity_bytes = models.BigIntegerField(null=True, blank=True)
    high_water_percent = models.PositiveSmallIntegerField(default=90)
    cleanup_percent = models.PositiveSmallIntegerField(default=80)
    # Separate from ``active``: a full buffer stops taking new packages and transfers but keeps
    # serving reads and its deletion queue. The disk monitor clears it above the high-water mark
    # and sets it again below the cleanup mark; while it is clear the deletion manager serves
    # this location first.
    accepting_writes = models.BooleanField(default=True)
    # The integrity manager re-verifies a copy here once its last verification is this old, and
    # the deletion manager counts an archive copy as verified only within it.
    verification_interval = models.DurationField(default=timedelta(days=30))
    # How long a copy here is kept after its package was ARCHIVED. Long-term archive copies are
    # never deleted by policy, whatever this says.
    retention_period = models.DurationField(default=timedelta(days=7))
    # Last measurement of the disk monitor (history in DataLocationUsage).
    used_bytes = models.BigIntegerField(null=True, blank=True)
    free_bytes = models.BigIntegerField(null=True, blank=True)
    usage_measured_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "data_location"
        ordering = ["site__short_name", "-priority", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["site", "name"],
                name="data_location_unique_name",
                violation_error_message="This site already has a location with this name.",
            ),
            choices_check("location_type", LocationType, "data_location_type_valid"),
            choices_check("storage_type", StorageType, "data_location_storage_valid"),
            choices_check("checksum_algorithm", ChecksumAlgorithm, "data_location_checksum_valid"),
            models.CheckConstraint(
                condition=models.Q(name__regex=r"^[a-z][a-z0-9_]*$"),
                name="data_location_name_queue_safe",
                violation_error_message=(
                    "The location name must start with a lowercase letter and contain only "
                    "a-z, 0-9 and _ (it becomes part of queue names)."
                ),
            ),
            models.CheckConstraint(
                condition=~models.Q(storage_type="disk") | ~models.Q(root_path=""),
                name="data_location_disk_has_root",
                violation_error_message="A disk location needs a root path.",
            ),
            models.CheckConstraint(
                condition=~models.Q(storage_type="s3") | ~models.Q(s3_bucket=""),
                name="data_location_s3_has_bucket",
                violation_error_message="An S3 location needs a bucket.",
            ),
            models.CheckConstraint(
                condition=models.Q(
                    cleanup_percent__lte=models.F("high_water_percent"), high_water_percent__lte=100
                ),
                name="data_location_thresholds_ordered",
                violation_error_message=(
                    "The cleanup mark must not be above the high-water mark, and the high-water "
                    "mark must be at most 100 percent."
                ),
            ),
            models.CheckConstraint(
                condition=models.Q(verification_interval__gt=timedelta(0)),
                name="data_location_verification_interval_positive",
                violation_error_message="The verification interval must be longer than zero.",
            ),
            models.CheckConstraint(
                condition=models.Q(retention_period__gte=timedelta(0)),
                name="data_location_retention_nonnegative",
                violation_error_message="The retention period cannot be negative.",
            ),
        ]
        indexes = [
            # get_primary_buffer_for_site(): active locations of a type at a site, by priority.
            models.Index(
                fields=["site", "location_type", "active", "-priority"],
                name="data_location_pick_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.site.short_name}:{self.name}"

    # The fields its queue names are made of; a save that changes none of them is not checked.
    _QUEUE_NAME_FIELDS = frozenset({"site", "site_id", "name", "location_type"})

    def clean(self) -> None:
        super().clean()
        _refuse_queue_clashes(self, "name")

    def save(self, *args: Any, **kwargs: Any) -> None:
        update_fields = kwargs.get("update_fields")
        if update_fields is None or self._QUEUE_NAME_FIELDS & set(update_fields):
            _refuse_queue_clashes(self, "name")
        super().save(*args, **kwargs)


class PhysicalCopyStatus(models.TextChoices):
    PRESENT = "present", "Present"
    STAGED = "staged", "Staged (unpacked)"
    DELETION_POSSIBLE = "deletion_possible", "Deletion possible"
    DELETION_SCHEDULED = "deletion_scheduled", "Deletion scheduled"
    DELETION_IN_PROGRESS = "deletion_in_progress", "Deletion in progress"
    DELETED = "deleted", "Deleted"
    DELETION_FAILED = "deletion_failed", "Deletion failed"


_C = PhysicalCopyStatus
# Every path to DELETED passes DELETION_SCHEDULED and DELETION_IN_PROGRESS. A scheduled
# deletion may be withdrawn (back to PRESENT) when a safety check fails before it starts.
COPY_TRANSITIONS: dict[str, set[str]] = {
    _C.PRESENT: {_C.DELETION_POSSIBLE, _C.DELETION_SCHEDULED},
    _C.STAGED: {_C.DELETION_POSSIBLE, _C.DELETION_SCHEDULED},
    _C.DELETION_POSSIBLE: {_C.DELETION_SCHEDULED, _C.PRESENT},
    _C.DELETION_SCHEDULED: {_C.DELETION_IN_PROGRESS, _C.PRESENT},
    _C.DELETION_IN_PROGRESS: {_C.DELETED, _C.DELETION_FAILED},
    _C.DELETION_FAILED: {_C.DELETION_SCHEDULED, _C.PRESENT},
    _C.DELETED: set(),
}


class DataLocationUsage(models.Model):
    """One measurement of a location's usage by the disk monitor (statvfs on disk, the sum of
    object sizes on S3)."""

    location = models.ForeignKey(DataLocation, on_delete=models.CASCADE, related_name="usage")
    measured_at = models.DateTimeField()
    used_bytes = models.BigIntegerField()
    free_bytes = models.BigIntegerField(null=True, blank=True)
    total_bytes = models.BigIntegerField(null=True, blank=True)

    class Meta:
        db_table = "data_location_usage"
        ordering = ["-measured_at"]
        indexes = [
            # Usage history of one location, newest first (admin, /health, plots).
            models.Index(fields=["location", "-measured_at"], name="data_location_usage_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.location_id} at {self.measured_at:%Y-%m-%d %H:%M}: {self.used_bytes} B used"


class DarkFile(models.Model):
    """A file found on storage by the audit that no live copy accounts for. Recorded for an
    operator to decide; never deleted automatically."""

    location = models.ForeignKey(DataLocation, on_delete=models.CASCADE, related_name="dark_files")
    relative_path = models.CharField(max_length=1000)
    size_bytes = models.BigIntegerField(default=0)
    first_seen_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()

    class Meta:
        db_table = "dark_file"
        ordering = ["location", "relative_path"]
        constraints = [
            models.UniqueConstraint(
                fields=["location", "relative_path"],
                name="dark_file_unique_path",
                violation_error_message="This dark file is already recorded.",
            ),
        ]

    def __str__(self) -> str:
        return f"dark file {self.relative_path} ({self.size_bytes} B)"


class Kind(models.TextChoices):
    RAW_DATA_FILE = "raw_data_file", "Raw data file"
    RAW_DATA_PACKAGE = "raw_data_package", "Raw data package"
    DATA_TRANSFER_PACKAGE = "data_transfer_package", "Data transfer package"
    DATA_PRODUCT = "data_product", "Data product"


class Integrity(models.TextChoices):
    UNVERIFIED = "unverified", "Not verified yet"
    VERIFIED = "verified", "Checksum verified"
    MISMATCH = "mismatch", "Checksum mismatch"
    MISSING = "missing", "Missing on storage"


_I = Integrity
# A copy's integrity moves with an event like its status. VERIFIED -> VERIFIED is not a move: a
# re-verification that finds the same checksum only refreshes checksum_verified_at. A repair
# (re-copy from a good copy) takes MISMATCH or MISSING back to VERIFIED.
INTEGRITY_TRANSITIONS: dict[str, set[str]] = {
    _I.UNVERIFIED: {_I.VERIFIED, _I.MISMATCH, _I.MISSING},
    _I.VERIFIED: {_I.MISMATCH, _I.MISSING},
    _I.MISMATCH: {_I.VERIFIED, _I.MISSING},
    _I.MISSING: {_I.VERIFIED, _I.MISMATCH},
}


class PhysicalCopy(StatefulModel, TimeStamped):
    """That one file, package, transfer bundle or product exists at one location.

    One table for the four kinds: exactly one of the object columns is set (check constraint),
    and ``kind`` names which, so ops-db style SQL can filter on it.
    """

    Kind = Kind

    Integrity = Integrity

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {
        "status": COPY_TRANSITIONS,
        "integrity": INTEGRITY_TRANSITIONS,
    }

    kind = models.CharField(max_length=24, choices=Kind.choices)
    raw_data_file = models.ForeignKey(
        "pipelines.RawDataFile",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="physical_copies",
    )
    raw_data_package = models.ForeignKey(
        "pipelines.RawDataPackage",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="physical_copies",
    )
    data_transfer_package = models.ForeignKey(
        "pipelines.DataTransferPackage",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="physical_copies",
    )
    data_product = models.ForeignKey(
        "pipelines.DataProduct",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="physical_copies",
    )
    location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, related_name="physical_copies"
    )
    # Path (disk) or key (S3) relative to the location root.
    relative_path = models.CharField(max_length=1000)
    status = models.CharField(
        max_length=24, choices=PhysicalCopyStatus.choices, default=PhysicalCopyStatus.PRESENT
    )
    integrity = models.CharField(
        max_length=12, choices=Integrity.choices, default=Integrity.UNVERIFIED
    )
    verified_checksum = models.CharField(max_length=128, blank=True, default="")
    checksum_verified_at = models.DateTimeField(null=True, blank=True)
    # The integrity manager's claim on a re-verification it dispatched: set by a conditional
    # UPDATE when the copy is handed to a worker, cleared when the result is written. A claim
    # whose worker died expires, and the copy is due again.
    verification_claimed_until = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)
    deletion_reason = models.TextField(blank=True, default="")
    retry_count = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        db_table = "physical_copy"
        verbose_name_plural = "physical copies"
        ordering = ["-created_at"]
        constraints = [
            choices_check("status", PhysicalCopyStatus, "physical_copy_status_valid"),
            choices_check("kind", Kind, "physical_copy_kind_valid"),
            choices_check("integrity", Integrity, "physical_copy_integrity_valid"),
            models.CheckConstraint(
                condition=(
                    models.Q(
                        kind="raw_data_file",
                        raw_data_file__isnull=False,
                        raw_data_package__isnull=True,
                        data_transfer_package__isnull=True,
                        data_product__isnull=True,
                    )
                    | models.Q(
                        kind="raw_data_package",
                        raw_data_file__isnull=True,
                        raw_data_package__isnull=False,
                        data_transfer_package__isnull=True,
                        data_product__isnull=True,
                    )
                    | models.Q(
                        kind="data_transfer_package",
                        raw_data_file__isnull=True,
                        raw_data_package__isnull=True,
                        data_transfer_package__isnull=False,
                        data_product__isnull=True,
                    )
                    | models.Q(
                        kind="data_product",
                        raw_data_file__isnull=True,
                        raw_data_package__isnull=True,
                        data_transfer_package__isnull=True,
                        data_product__isnull=False,
                    )
                ),
                name="physical_copy_exactly_one_object",
                violation_error_message=(
                    "A physical copy must point at exactly one object, the one its kind names."
                ),
            ),
            # At most one live record of an object per location; DELETED rows are history.
            models.UniqueConstraint(
                fields=["raw_data_file", "location"],
                condition=~models.Q(status="deleted"),
                name="physical_copy_one_live_file_per_location",
                violation_error_message=(
                    "This file already has a copy at this location that is not deleted."
                ),
            ),
            models.UniqueConstraint(
                fields=["raw_data_package", "location"],
                condition=~models.Q(status="deleted"),
                name="physical_copy_one_live_package_per_location",
                violation_error_message=(
                    "This package already has a copy at this location that is not deleted."
                ),
            ),
            models.UniqueConstraint(
                fields=["data_transfer_package", "location"],
                condition=~models.Q(status="deleted"),
                name="physical_copy_one_live_dtp_per_location",
                violation_error_message=(
                    "This transfer bundle already has a copy at this location that is not deleted."
                ),
            ),
            models.UniqueConstraint(
                fields=["data_product", "location"],
                condition=~models.Q(status="deleted"),
                name="physical_copy_one_live_product_per_location",
                violation_error_message=(
                    "This data product already has a copy at this location that is not deleted."
                ),
            ),
        ]
        indexes = [
            # Deletion manager: copies at a location in a given status.
            models.Index(fields=["location", "status"], name="physical_copy_loc_status_idx"),
            # Integrity manager: oldest verification first.
            models.Index(
                fields=["status", "checksum_verified_at"], name="physical_copy_verify_due_idx"
            ),
        ]

    def __str__(self) -> str:
        # Follows location and its site: admin lists select them (list_select_related).
        return (
            f"{self.get_kind_display()} copy at {self.location}: {self.relative_path} "
            f"[{self.get_status_display()}]"
        )
