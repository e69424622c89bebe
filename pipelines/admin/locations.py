"""Admin for sites, storage locations and physical copies."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse

from pipelines.models import (
    DarkFile,
    DataLocation,
    DataLocationUsage,
    DeletionTask,
    PhysicalCopy,
    Site,
)

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
        "accepting_writes",
        "checksum_algorithm",
        "capacity_bytes_readable",
        "used_bytes_readable",
    )
    list_filter = ("location_type", "storage_type", "active", "accepting_writes", "site")
    search_fields = ("name", "site__short_name", "root_path", "s3_bucket", "host")
    list_select_related = ("site",)
    ordering = ("site__short_name", "-priority", "name")
    fieldsets = (
        (None, {"fields": ("site", "name", "location_type", "priority", "active")}),
        ("Storage", {"fields": ("storage_type", "host", "root_path", "checksum_algorithm")}),
        ("S3", {"fields": ("s3_endpoint_url", "s3_bucket", "s3_region", "s3_prefix")}),
        (
            "Disk monitor",
            {
                "fields": (
                    "capacity_bytes",
                    "high_water_percent",
                    "cleanup_percent",
                    "accepting_writes",
                    "used_bytes_readable",
                    "free_bytes_readable",
                    "usage_measured_at",
                )
            },
        ),
        ("Safety", {"fields": ("verification_interval", "retention_period")}),
        ("System", {"fields": ("created_at", "updated_at")}),
    )
    # Measured by the disk monitor, not typed in.
    system_fields = ("used_bytes", "free_bytes", "usage_measured_at")
    # Storage audit and disk monitor (issue 10): both through their services.
    actions = ("audit_storage_now", "measure_usage_now", "show_deletion_plan")

    @admin.action(description="Audit storage now (dark files, lost copies)", permissions=["change"])
    def audit_storage_now(self, request: HttpRequest, queryset: QuerySet[DataLocation]) -> None:
        """Audit each selected location (``location_audit_request``): small ones at once, with
        the findings in the message, large ones on their workers' integrity_check queue."""
        from pipelines.exceptions import OperationError
        from pipelines.services.audit import location_audit_request

        from .actions import NAMED_LIMIT
        from .base import admin_actor

        for location in queryset.select_related("site")[:NAMED_LIMIT]:
            try:
                report = location_audit_request(location, actor=admin_actor(request))
            except (OperationError, ValueError) as exc:
                self.message_user(request, f"{location}: not audited: {exc}", messages.ERROR)
                continue
            if report is None:
                self.message_user(
                    request,
                    f"{location}: large location, audit queued for its workers; findings "
                    "appear under Dark files and as MISSING copies.",
                    messages.INFO,
                )
            else:
                level = messages.WARNING if report.lost_marked or report.dark else messages.SUCCESS
                self.message_user(request, report.summary(), level)
        if queryset.count() > NAMED_LIMIT:
            self.message_user(
                request,
                f"Only the first {NAMED_LIMIT} locations were audited; run it again for the rest.",
                messages.WARNING,
            )

    @admin.action(description="Measure usage now (disk monitor)", permissions=["change"])
    def measure_usage_now(self, request: HttpRequest, queryset: QuerySet[DataLocation]) -> None:
        """Measure each selected location at once (``location_measure_usage``), applying the
        high-water and cleanup marks as the disk monitor does."""
        from pipelines.exceptions import OperationError
        from pipelines.services.disk import location_measure_usage

        from .actions import NAMED_LIMIT

        for location in queryset.select_related("site")[:NAMED_LIMIT]:
            try:
                location_measure_usage(location)
            except (OperationError, OSError) as exc:
                self.message_user(request, f"{location}: not measured: {exc}", messages.ERROR)
                continue
            writes = "accepting writes" if location.accepting_writes else "NOT accepting writes"
            free = "unknown" if location.free_bytes is None else f"{location.free_bytes} B"
            self.message_user(
                request,
                f"{location}: {location.used_bytes} B used, {free} free; {writes}.",
                messages.SUCCESS if location.accepting_writes else messages.WARNING,
            )

    # Deletion (issue 10): the same dry run as manage.py deletion_plan, through the service.
    @admin.action(description="Deletion plan (dry run)", permissions=["view"])
    def show_deletion_plan(self, request: HttpRequest, queryset: QuerySet[DataLocation]) -> Any:
        """The deletion plan of the selected locations (``deletion_plan``): what would be
        deleted now and why, and for each kept copy the first rule keeping it."""
        from itertools import chain

        from pipelines.services.deletion import deletion_plan

        locations = list(queryset.select_related("site")[:DELETION_PLAN_LOCATIONS])
        entries = chain.from_iterable(deletion_plan(location=loc) for loc in locations)
        arg = f"{locations[0].site.short_name}:{locations[0].name}" if len(locations) == 1 else ""
        return deletion_plan_page(self, request, entries, location_arg=arg)


# Deletion (issue 10): the deletion plan page shared by the location and copy admins.
DELETION_PLAN_LOCATIONS = 10
# Copies judged for one page (a request must stay short), and rows shown of them.
DELETION_PLAN_EXAMINED = 20_000
DELETION_PLAN_SHOWN = 500


def deletion_plan_page(
    modeladmin: admin.ModelAdmin, request: HttpRequest, entries: Any, *, location_arg: str = ""
) -> TemplateResponse:
    """Render plan entries (an iterator of ``PlanEntry``): a summary by rule of the first
    ``DELETION_PLAN_EXAMINED`` and a table of the first ``DELETION_PLAN_SHOWN``."""
    from collections import Counter

    from django.urls import reverse

    from pipelines.management.commands.deletion_plan import plan_summary

    counts: Counter[str] = Counter()
    shown: list[Any] = []
    examined = 0
    truncated = False
    for entry in entries:
        if examined == DELETION_PLAN_EXAMINED:
            truncated = True
            break
        examined += 1
        counts[entry.verdict.rule] += 1
        if len(shown) < DELETION_PLAN_SHOWN:
            shown.append(entry)
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "opts": opts,
        "title": "Deletion plan",
        "summary": plan_summary(counts),
        "entries": shown,
        "examined": examined,
        "truncated": truncated,
        "shown_limit_hit": examined > len(shown),
        "location_arg": location_arg,
        "changelist_url": reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"),
    }
    return TemplateResponse(request, "admin/pipelines/deletion_plan.html", context)


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
        "verification_claimed_until",
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
    # Integrity (issue 10): an operator's re-verification through the integrity service.
    actions = ("verify_now", "show_deletion_plan")

    # Deletion (issue 10): each selected copy's verdict, as manage.py deletion_plan gives it.
    @admin.action(description="Deletion plan (dry run)", permissions=["view"])
    def show_deletion_plan(self, request: HttpRequest, queryset: QuerySet[PhysicalCopy]) -> Any:
        from pipelines.services.deletion import deletion_plan

        return deletion_plan_page(self, request, deletion_plan(copies=queryset))

    @admin.action(
        description="Verify now (read back and compare checksums)", permissions=["change"]
    )
    def verify_now(self, request: HttpRequest, queryset: QuerySet[PhysicalCopy]) -> None:
        """Dispatch a verification of each selected copy to its location's workers
        (``copies_verify_now``); the result appears on the copy and in its events."""
        from pipelines.services.integrity import copies_verify_now

        from .actions import ACTION_LIMIT

        rows = list(queryset[:ACTION_LIMIT])
        dispatched = copies_verify_now(rows)
        self.message_user(
            request,
            f"Dispatched {dispatched} verification(s) to the workers; "
            f"{len(rows) - dispatched} skipped (being deleted, deleted, or already being "
            "verified). Results appear on each copy and in its events.",
            messages.SUCCESS if dispatched else messages.WARNING,
        )


@admin.register(DataLocationUsage)
class DataLocationUsageAdmin(OpsModelAdmin):
    """The disk monitor's measurements: looked at, never written by hand."""

    list_display = (
        "measured_at",
        "location",
        "used_bytes_readable",
        "free_bytes_readable",
        "total_bytes_readable",
    )
    list_filter = ("location__site", "location")
    list_select_related = ("location__site",)
    date_hierarchy = "measured_at"
    ordering = ("-measured_at",)
    show_full_result_count = False
    actions = None

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


@admin.register(DarkFile)
class DarkFileAdmin(OpsModelAdmin):
    """Files the storage audit found that no copy accounts for. Kept for an operator to look at;
    the system never deletes them."""

    list_display = (
        "relative_path",
        "location",
        "size_bytes_readable",
        "first_seen_at",
        "last_seen_at",
    )
    list_filter = ("location__site", "location")
    search_fields = ("relative_path",)
    list_select_related = ("location__site",)
    ordering = ("location", "relative_path")
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False
