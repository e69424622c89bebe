"""Admin for raw files, raw data packages and transfer bundles."""

from __future__ import annotations

from django.contrib import admin

from pipelines.models import (
    DataTransfer,
    DataTransferPackage,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
)

from .actions import OPERATION_ACTIONS, reset_failed_package_state
from .base import OpsModelAdmin, ReadOnlyTabularInline, changelist_link

# The operation columns every Operation changelist shows after its own columns.
OPERATION_COLUMNS = ("status", "retry_count", "lease_owner", "updated_at")


class CopyInline(ReadOnlyTabularInline):
    """Where an object is: one row per physical copy, live or deleted."""

    model = PhysicalCopy
    fields = ("location", "status", "integrity", "checksum_verified_at", "relative_path")
    readonly_fields = fields
    select_related = ("location__site",)
    verbose_name_plural = "physical copies (newest first, first 50)"


class FileInline(ReadOnlyTabularInline):
    model = RawDataFile
    fields = ("name", "relative_path", "size_readable", "checksum")
    readonly_fields = fields
    verbose_name_plural = "files (first 50 by path)"


@admin.register(RawDataFile)
class RawDataFileAdmin(OpsModelAdmin):
    """Files. Size and checksum are facts recorded at ingest; they are fixed afterwards."""

    list_display = (
        "relative_path",
        "instrument_module",
        "source_location",
        "size_readable",
        "raw_data_package",
        "created_at",
    )
    list_filter = ("source_location__site", "source_location", "checksum_algorithm")
    search_fields = ("name", "relative_path", "checksum")
    list_select_related = (
        "instrument_module__instrument",
        "source_location__site",
        "raw_data_package",
    )
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("executed_obs_unit", "raw_data_package")
    # Facts of the scan: where the file is and what it holds never change after ingest.
    change_readonly_fields = ("relative_path", "size", "checksum", "checksum_algorithm")
    inlines = (CopyInline,)


@admin.register(RawDataPackage)
class RawDataPackageAdmin(OpsModelAdmin):
    """Packages. ``status`` is building the tar, ``state`` its journey to the archive; both move
    only through transitions (actions below), and the tar's size and checksum are computed."""

    list_display = (
        "name",
        "instrument_module",
        "origin_location",
        "state",
        *OPERATION_COLUMNS,
        "size_readable",
        "file_count",
        "created_at",
    )
    list_filter = (
        "state",
        "status",
        "origin_location__site",
        "origin_location",
        "instrument_module__instrument",
    )
    search_fields = ("name", "relative_path", "checksum")
    list_select_related = ("instrument_module__instrument", "origin_location__site")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("executed_obs_unit", "data_transfer_package")
    system_fields = ("archived_at", "all_files")
    change_readonly_fields = ("size", "file_count", "checksum", "checksum_algorithm")
    inlines = (FileInline, CopyInline)
    actions = (*OPERATION_ACTIONS, reset_failed_package_state)

    @admin.display(description="All files")
    def all_files(self, obj: RawDataPackage) -> str:
        return changelist_link(
            RawDataFile, "Every file of this package", raw_data_package__id__exact=obj.pk
        )


class PackageOfBundleInline(ReadOnlyTabularInline):
    model = RawDataPackage
    fields = ("name", "state", "status", "size_readable")
    readonly_fields = fields
    verbose_name_plural = "raw data packages (first 50)"


class TransferOfBundleInline(ReadOnlyTabularInline):
    model = DataTransfer
    fields = ("destination_location", "status", "unpack_status", "retry_count", "updated_at")
    readonly_fields = fields
    select_related = (
        "data_transfer_package",
        "origin_location__site",
        "destination_location__site",
    )
    verbose_name_plural = "transfers (first 50)"


@admin.register(DataTransferPackage)
class DataTransferPackageAdmin(OpsModelAdmin):
    list_display = (
        "name",
        "origin_location",
        *OPERATION_COLUMNS,
        "size_readable",
        "created_at",
    )
    list_filter = ("status", "origin_location__site", "origin_location")
    search_fields = ("name", "relative_path", "checksum")
    list_select_related = ("origin_location__site",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    change_readonly_fields = ("size", "checksum", "checksum_algorithm")
    inlines = (PackageOfBundleInline, TransferOfBundleInline, CopyInline)
    actions = OPERATION_ACTIONS
