"""Admin for sites, storage locations and physical copies."""

from __future__ import annotations

from django.contrib import admin

from pipelines.models import DataLocation, DeletionTask, PhysicalCopy, Site

from .base import OpsModelAdmin, OpsTabularInline, ReadOnlyTabularInline


class DataLocationInline(OpsTabularInline):
    model = DataLocation
    fields = ("name", "location_type", "storage_type", "priority", "active", "root_path")


@admin.register(Site)
class SiteAdmin(OpsModelAdmin):
    list_display = ("short_name", "name", "location", "min_archive_copies")
    search_fields = ("short_name", "name", "location")
    ordering = ("short_name",)
    inlines = (DataLocationInline,)


@admin.register(DataLocation)
class DataLocationAdmin(OpsModelAdmin):
    list_display = (
        "__str__",
        "site",
        "location_type",
        "storage_type",
        "priority",
        "active",
        "checksum_algorithm",
        "capacity_bytes_readable",
    )
    list_filter = ("location_type", "storage_type", "active", "site")
    search_fields = ("name", "site__short_name", "root_path", "s3_bucket", "host")
    list_select_related = ("site",)
    ordering = ("site__short_name", "-priority", "name")
    fieldsets = (
        (None, {"fields": ("site", "name", "location_type", "priority", "active")}),
        ("Storage", {"fields": ("storage_type", "host", "root_path", "checksum_algorithm")}),
        ("S3", {"fields": ("s3_endpoint_url", "s3_bucket", "s3_region", "s3_prefix")}),
        ("Disk monitor", {"fields": ("capacity_bytes", "high_water_percent", "cleanup_percent")}),
        ("System", {"fields": ("created_at", "updated_at")}),
    )


class DeletionTaskOfCopyInline(ReadOnlyTabularInline):
    model = DeletionTask
    fields = ("status", "reason", "retry_count", "failure_error_message", "created_at")
    readonly_fields = fields
    select_related = ("physical_copy__location__site",)


@admin.register(PhysicalCopy)
class PhysicalCopyAdmin(OpsModelAdmin):
    """Copies. ``status`` moves only through transitions and ``integrity`` and the verified
    checksum only through verification, so all of them are read-only here."""

    list_display = (
        "id",
        "kind",
        "location",
        "relative_path",
        "status",
        "integrity",
        "checksum_verified_at",
        "created_at",
    )
    list_filter = ("status", "integrity", "kind", "location__site", "location")
    search_fields = ("relative_path", "verified_checksum")
    list_select_related = ("location__site",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("raw_data_file", "raw_data_package", "data_transfer_package", "data_product")
    system_fields = (
        "integrity",
        "verified_checksum",
        "checksum_verified_at",
        "deleted_at",
        "deletion_reason",
        "last_error",
    )
    change_readonly_fields = (
        "kind",
        "raw_data_file",
        "raw_data_package",
        "data_transfer_package",
        "data_product",
        "location",
    )
    inlines = (DeletionTaskOfCopyInline,)
