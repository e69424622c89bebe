"""Admin for routes and the operations that move data: transfer, archive, staging, deletion,
repair."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from pipelines.models import (
    CopyRepair,
    DataTransfer,
    DataTransferLog,
    DataTransferRoute,
    DeletionTask,
    LongTermArchiveTransfer,
    PrimaryTransferCursor,
    StagingJob,
)

from .actions import OPERATION_ACTIONS, reset_failed_unpacking
from .base import OpsModelAdmin, ReadOnlyTabularInline
from .files import OPERATION_COLUMNS


@admin.register(DataTransferRoute)
class DataTransferRouteAdmin(OpsModelAdmin):
    list_display = (
        "name",
        "origin_site",
        "destination_site",
        "route_type",
        "is_primary",
        "relay_site",
        "method",
        "priority",
        "active",
    )
    list_filter = ("route_type", "is_primary", "active", "origin_site", "destination_site")
    search_fields = ("name", "origin_site__short_name", "destination_site__short_name")
    list_select_related = (
        "origin_site",
        "destination_site",
        "relay_site",
        "origin_location__site",
        "destination_location__site",
    )
    ordering = ("origin_site__short_name", "-priority")


@admin.register(PrimaryTransferCursor)
class PrimaryTransferCursorAdmin(OpsModelAdmin):
    """Where each observatory's round-robin over its primary routes stands. Written only by the
    transfer manager (under a row lock); shown so an operator can see which archive is next."""

    list_display = ("origin_site", "last_route", "updated_at")
    list_select_related = ("origin_site", "last_route")
    readonly_fields = ("origin_site", "last_route", "created_at", "updated_at")

    def has_add_permission(self, request: Any) -> bool:
        return False


class TransferLogInline(ReadOnlyTabularInline):
    model = DataTransferLog
    fields = ("timestamp", "level", "message", "log_path")
    readonly_fields = fields
    verbose_name_plural = "logs (newest first, first 50)"


@admin.register(DataTransfer)
class DataTransferAdmin(OpsModelAdmin):
    """Transfers. The copy (``status``) and the unpacking at the destination
    (``unpack_status``) are reset separately, so unpacking is retried without copying again."""

    list_display = (
        "id",
        "data_transfer_package",
        "origin_location",
        "destination_location",
        "is_primary",
        "unpack_status",
        *OPERATION_COLUMNS,
    )
    list_filter = (
        "status",
        "unpack_status",
        "is_primary",
        "origin_location__site",
        "destination_location__site",
    )
    search_fields = ("data_transfer_package__name", "failure_error_message")
    list_select_related = (
        "data_transfer_package",
        "origin_location__site",
        "destination_location__site",
    )
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("data_transfer_package",)
    system_fields = ("unpack_retry_count", "unpack_error_message", "bytes_transferred")
    inlines = (TransferLogInline,)
    actions = (*OPERATION_ACTIONS, reset_failed_unpacking)


class LogLevelFilter(admin.SimpleListFilter):
    """Log levels from a fixed list: ``level`` has no choices, and a ``SELECT DISTINCT`` over
    every log row would be slow."""

    title = "level"
    parameter_name = "level"
    LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(level, level.title()) for level in self.LEVELS]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value():
            return queryset.filter(level=self.value())
        return queryset


@admin.register(DataTransferLog)
class DataTransferLogAdmin(OpsModelAdmin):
    """Pointers to transfer log files, written by the workers."""

    list_display = ("timestamp", "data_transfer", "level", "message", "log_path")
    list_select_related = (
        "data_transfer__data_transfer_package",
        "data_transfer__origin_location__site",
        "data_transfer__destination_location__site",
    )
    list_filter = (LogLevelFilter,)
    search_fields = ("message", "log_path")
    date_hierarchy = "timestamp"
    ordering = ("-timestamp",)
    show_full_result_count = False
    raw_id_fields = ("data_transfer",)
    system_fields = ("timestamp",)
    change_readonly_fields = ("data_transfer", "log_path")


@admin.register(LongTermArchiveTransfer)
class LongTermArchiveTransferAdmin(OpsModelAdmin):
    list_display = (
        "id",
        "raw_data_package",
        "origin_location",
        "destination_location",
        *OPERATION_COLUMNS,
    )
    list_filter = ("status", "destination_location__site", "destination_location")
    search_fields = ("raw_data_package__name", "sidecar_path", "failure_error_message")
    list_select_related = (
        "raw_data_package",
        "origin_location__site",
        "destination_location__site",
    )
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("raw_data_package",)
    actions = OPERATION_ACTIONS


@admin.register(StagingJob)
class StagingJobAdmin(OpsModelAdmin):
    list_display = (
        "id",
        "destination_location",
        "user",
        "active",
        "expires_at",
        *OPERATION_COLUMNS,
    )
    list_filter = ("status", "active", "destination_location__site", "destination_location")
    search_fields = ("user__username", "failure_error_message")
    list_select_related = ("destination_location__site", "user")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("raw_data_packages", "user")
    actions = OPERATION_ACTIONS


@admin.register(DeletionTask)
class DeletionTaskAdmin(OpsModelAdmin):
    """Deletion decisions. They are made by the deletion service after its safety checks
    (archived, enough verified archive copies, nothing staged or running needs the copy), so
    they cannot be added by hand here."""

    list_display = ("id", "physical_copy", "reason", *OPERATION_COLUMNS)
    list_filter = ("status", "physical_copy__location__site", "physical_copy__location")
    search_fields = ("reason", "physical_copy__relative_path", "failure_error_message")
    list_select_related = ("physical_copy__location__site",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("physical_copy",)
    change_readonly_fields = ("physical_copy", "reason")
    actions = OPERATION_ACTIONS

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(CopyRepair)
class CopyRepairAdmin(OpsModelAdmin):
    """Repairs of damaged copies. The integrity service creates them when it finds a mismatch or a
    missing file; they cannot be added by hand."""

    list_display = ("id", "physical_copy", "source_copy", "reason", *OPERATION_COLUMNS)
    list_filter = ("status", "physical_copy__location__site", "physical_copy__location")
    search_fields = ("reason", "physical_copy__relative_path", "failure_error_message")
    list_select_related = ("physical_copy__location__site", "source_copy__location__site")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("physical_copy", "source_copy")
    change_readonly_fields = ("physical_copy", "source_copy", "reason")
    actions = OPERATION_ACTIONS

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
