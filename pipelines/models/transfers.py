"""Routes and the operations that move data: transfer, archive, staging, deletion (ops-db §4)."""

from __future__ import annotations

from typing import ClassVar

from django.conf import settings
from django.db import models

from .base import (
    STATUS_TRANSITIONS,
    Operation,
    Phase,
    Status,
    TimeStamped,
    choices_check,
    operation_indexes,
)
from .locations import DataLocation, Site


class RouteType(models.TextChoices):
    # The usual hop: into the destination site's buffer, archived from there.
    BUFFERED = "buffered", "Buffered (into the destination buffer, archived there)"
    DIRECT = "direct", "Direct (skip destination buffer)"
    RELAY = "relay", "Relay (through an intermediate site)"
    CUSTOM = "custom", "Custom (location to location)"


class DataTransferRoute(TimeStamped):
    RouteType = RouteType

    name = models.CharField(max_length=100, unique=True)
    origin_site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="routes_out")
    destination_site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="routes_in")
    route_type = models.CharField(
        max_length=8, choices=RouteType.choices, default=RouteType.BUFFERED
    )
    # Primary: the one route a package leaves its observatory by (round-robin over the primary
    # routes of a site); secondary: replication between long-term archive sites.
    is_primary = models.BooleanField(default=False)
    method = models.CharField(max_length=20, default="copy", help_text="copy, rsync, bbcp, s3")
    origin_location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, null=True, blank=True, related_name="routes_out"
    )
    destination_location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, null=True, blank=True, related_name="routes_in"
    )
    relay_site = models.ForeignKey(
        Site, on_delete=models.PROTECT, null=True, blank=True, related_name="relayed_routes"
    )
    active = models.BooleanField(default=True)
    priority = models.IntegerField(default=0)

    class Meta:
        db_table = "data_transfer_route"
        ordering = ["origin_site__short_name", "-priority"]
        constraints = [
            choices_check("route_type", RouteType, "data_transfer_route_type_valid"),
            models.CheckConstraint(
                condition=~models.Q(origin_site=models.F("destination_site")),
                name="data_transfer_route_distinct_sites",
                violation_error_message="A route must go from one site to a different site.",
            ),
            models.CheckConstraint(
                condition=~models.Q(route_type="relay") | models.Q(relay_site__isnull=False),
                name="data_transfer_route_relay_has_site",
                violation_error_message="A relay route needs a relay site.",
            ),
            models.CheckConstraint(
                condition=~models.Q(route_type="custom")
                | models.Q(origin_location__isnull=False, destination_location__isnull=False),
                name="data_transfer_route_custom_has_locations",
                violation_error_message=(
                    "A custom route needs both an origin and a destination location."
                ),
            ),
        ]

    def __str__(self) -> str:
        return self.name


class DataTransfer(Operation):
    """One bundle copied from one location to another. Unpacking at the destination is tracked
    apart (``unpack_status``) so it can be retried without copying again."""

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {
        "status": STATUS_TRANSITIONS,
        "unpack_status": STATUS_TRANSITIONS,
    }
    # Unpacking is claimed, leased, retried and recovered like the copy, once the copy completed.
    PHASES: ClassVar[dict[str, Phase]] = {
        **Operation.PHASES,
        "unpack_status": Phase(
            "unpack_status",
            "unpack_retry_count",
            "unpack_error_message",
            {"status": "completed"},
            started_field="unpack_started_at",
            finished_field="unpack_finished_at",
        ),
    }

    data_transfer_package = models.ForeignKey(
        "pipelines.DataTransferPackage", on_delete=models.PROTECT, related_name="transfers"
    )
    origin_location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, related_name="transfers_out"
    )
    destination_location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, related_name="transfers_in"
    )
    route = models.ForeignKey(
        DataTransferRoute, on_delete=models.PROTECT, null=True, blank=True, related_name="transfers"
    )
    method = models.CharField(max_length=20, default="copy")
    # Primary: the one time a package leaves the observatory; secondary: archive-to-archive.
    is_primary = models.BooleanField(default=True)
    unpack_status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    unpack_retry_count = models.PositiveIntegerField(default=0)
    unpack_error_message = models.TextField(blank=True, default="")
    unpack_started_at = models.DateTimeField(null=True, blank=True)
    unpack_finished_at = models.DateTimeField(null=True, blank=True)
    bytes_transferred = models.BigIntegerField(default=0)

    class Meta:
        db_table = "data_transfer"
        ordering = ["-created_at"]
        constraints = [
            choices_check("status", Status, "data_transfer_status_valid"),
            choices_check("unpack_status", Status, "data_transfer_unpack_status_valid"),
            models.CheckConstraint(
                condition=~models.Q(origin_location=models.F("destination_location")),
                name="data_transfer_distinct_locations",
                violation_error_message=(
                    "A transfer must go to a different location than it comes from."
                ),
            ),
            # Nothing is unpacked before the bundle has arrived.
            models.CheckConstraint(
                condition=models.Q(unpack_status="pending") | models.Q(status="completed"),
                name="data_transfer_unpack_after_transfer",
                violation_error_message=(
                    "A bundle can only be unpacked after its transfer has completed."
                ),
            ),
            # Each bundle leaves the observatory once: one primary transfer that is not failed.
            models.UniqueConstraint(
                fields=["data_transfer_package"],
                condition=models.Q(is_primary=True) & ~models.Q(status="failed"),
                name="data_transfer_one_live_primary",
                violation_error_message=(
                    "This bundle already has a primary transfer that has not failed."
                ),
            ),
            # No second copy of a bundle to a destination while one is live.
            models.UniqueConstraint(
                fields=["data_transfer_package", "destination_location"],
                condition=~models.Q(status="failed"),
                name="data_transfer_one_live_per_destination",
                violation_error_message=(
                    "This bundle already has a transfer to this destination that has not failed."
                ),
            ),
        ]
        indexes = [
            *operation_indexes("data_transfer"),
            models.Index(fields=["status", "unpack_status"], name="data_transfer_unpack_due_idx"),
        ]

    def __str__(self) -> str:
        # Follows the bundle and both locations with their sites: admin lists select them.
        return (
            f"{self.data_transfer_package.name}: {self.origin_location} -> "
            f"{self.destination_location}"
        )


class DataTransferLog(models.Model):
    """A pointer to a detailed log file; the log itself stays on disk."""

    data_transfer = models.ForeignKey(DataTransfer, on_delete=models.CASCADE, related_name="logs")
    timestamp = models.DateTimeField(auto_now_add=True)
    level = models.CharField(max_length=10, default="INFO")
    message = models.CharField(max_length=500, blank=True, default="")
    log_path = models.CharField(max_length=1000)

    class Meta:
        db_table = "data_transfer_log"
        ordering = ["-timestamp"]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.level} {self.message}"


class LongTermArchiveTransfer(Operation):
    """Copy of one raw data package from a buffer into a long-term archive location."""

    raw_data_package = models.ForeignKey(
        "pipelines.RawDataPackage", on_delete=models.PROTECT, related_name="archive_transfers"
    )
    origin_location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, related_name="archive_transfers_out"
    )
    destination_location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, related_name="archive_transfers_in"
    )
    sidecar_path = models.CharField(max_length=1000, blank=True, default="")

    class Meta:
        db_table = "long_term_archive_transfer"
        ordering = ["-created_at"]
        constraints = [
            choices_check("status", Status, "lta_transfer_status_valid"),
            # One archive operation in flight per package and archive. A completed one does not
            # block another: a copy found corrupt later is re-archived by a new transfer (the
            # planner skips packages that already have a live copy there).
            models.UniqueConstraint(
                fields=["raw_data_package", "destination_location"],
                condition=models.Q(status__in=["pending", "scheduled", "in_progress"]),
                name="lta_transfer_one_in_flight_per_destination",
                violation_error_message=(
                    "This package is already being archived to this location."
                ),
            ),
        ]
        indexes = operation_indexes("lta_transfer")

    def __str__(self) -> str:
        # Follows the package and both locations with their sites: admin lists select them.
        return (
            f"archive {self.raw_data_package.name}: {self.origin_location} -> "
            f"{self.destination_location}"
        )


class StagingJob(Operation):
    """A request to bring archived packages to a PROCESSING location and unpack them there."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="staging_jobs",
    )
    raw_data_packages = models.ManyToManyField(
        "pipelines.RawDataPackage",
        related_name="staging_jobs",
        db_table="staging_job_raw_data_package",
    )
    origin_location = models.ForeignKey(
        DataLocation,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="staging_jobs_out",
    )
    destination_location = models.ForeignKey(
        DataLocation, on_delete=models.PROTECT, related_name="staging_jobs_in"
    )
    # While active, the staged copies are protected from deletion.
    active = models.BooleanField(default=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "staging_job"
        ordering = ["-created_at"]
        constraints = [choices_check("status", Status, "staging_job_status_valid")]
        indexes = [
            *operation_indexes("staging_job"),
            # Deletion manager: which processing copies an active job still needs.
            models.Index(fields=["destination_location", "active"], name="staging_job_active_idx"),
        ]

    def __str__(self) -> str:
        # A job has no name of its own: who asked, and where the data goes.
        requester = self.user.get_username() if self.user else "system"
        return f"staging for {requester} -> {self.destination_location}"


class DeletionTask(Operation):
    """The decision to delete one physical copy, with the reason it was judged safe."""

    physical_copy = models.ForeignKey(
        "pipelines.PhysicalCopy", on_delete=models.PROTECT, related_name="deletion_tasks"
    )
    reason = models.TextField()

    class Meta:
        db_table = "deletion_task"
        ordering = ["-created_at"]
        constraints = [
            choices_check("status", Status, "deletion_task_status_valid"),
            models.UniqueConstraint(
                fields=["physical_copy"],
                condition=models.Q(status__in=["pending", "scheduled", "in_progress"]),
                name="deletion_task_one_live_per_copy",
                violation_error_message=(
                    "This copy already has a deletion waiting or in progress."
                ),
            ),
        ]
        indexes = operation_indexes("deletion_task")

    def __str__(self) -> str:
        return f"delete {self.physical_copy}"


class CopyRepair(Operation):
    """Re-copy of one damaged copy (integrity MISMATCH or MISSING) from a verified good copy of the
    same object: written to a temporary name, verified, then renamed over the bad one, so the row
    keeps its id and history. The source is chosen when the worker starts (a good copy then), and a
    damaged copy is never a source."""

    physical_copy = models.ForeignKey(
        "pipelines.PhysicalCopy", on_delete=models.PROTECT, related_name="repairs"
    )
    source_copy = models.ForeignKey(
        "pipelines.PhysicalCopy",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="repairs_sourced",
    )
    reason = models.TextField(blank=True, default="")

    class Meta:
        db_table = "copy_repair"
        ordering = ["-created_at"]
        constraints = [
            choices_check("status", Status, "copy_repair_status_valid"),
            models.UniqueConstraint(
                fields=["physical_copy"],
                condition=models.Q(status__in=["pending", "scheduled", "in_progress"]),
                name="copy_repair_one_live_per_copy",
                violation_error_message="This copy already has a repair waiting or in progress.",
            ),
        ]
        indexes = operation_indexes("copy_repair")

    def __str__(self) -> str:
        return f"repair {self.physical_copy}"


class PrimaryTransferCursor(TimeStamped):
    """Where the round-robin over an origin site's primary routes stands (three packages, two
    archive sites: A, B, A). The transfer manager locks this row to pick the next route, so two
    managers ticking at once still alternate instead of both choosing A."""

    origin_site = models.OneToOneField(
        Site, on_delete=models.CASCADE, primary_key=True, related_name="primary_transfer_cursor"
    )
    last_route = models.ForeignKey(
        DataTransferRoute, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        db_table = "primary_transfer_cursor"

    def __str__(self) -> str:
        last = self.last_route.name if self.last_route else "none yet"
        return f"round-robin of {self.origin_site.short_name}: last route {last}"
