"""Admin for reduction software, groupings, pipelines, steps, runs and products."""

from __future__ import annotations

from django.contrib import admin

from pipelines.models import (
    DataGrouping,
    DataProduct,
    ExecutedReductionStep,
    Pipeline,
    ReductionSoftware,
    ReductionSoftwareVersion,
    ReductionStep,
    ReductionStepConfig,
)

from .actions import (
    cancel_runs,
    disable_pipelines,
    enable_pipelines,
    recover_leases_now,
    retry_failed_runs,
)
from .base import OpsModelAdmin, OpsTabularInline, ReadOnlyTabularInline
from .files import CopyInline


class SoftwareVersionInline(OpsTabularInline):
    model = ReductionSoftwareVersion
    fields = ("version", "image_ref", "is_active", "released_at")


@admin.register(ReductionSoftware)
class ReductionSoftwareAdmin(OpsModelAdmin):
    list_display = ("name", "repository_url", "updated_at")
    search_fields = ("name", "description")
    ordering = ("name",)
    inlines = (SoftwareVersionInline,)


@admin.register(ReductionSoftwareVersion)
class ReductionSoftwareVersionAdmin(OpsModelAdmin):
    list_display = ("software", "version", "image_ref", "is_active", "released_at")
    list_filter = ("is_active", "software")
    search_fields = ("version", "image_ref", "software__name")
    list_select_related = ("software",)
    ordering = ("software__name", "-created_at")


@admin.register(ReductionStepConfig)
class ReductionStepConfigAdmin(OpsModelAdmin):
    """Step configurations are immutable by convention (runs record what they used): change one
    by adding a new row, which is why the parameters are fixed once saved."""

    list_display = ("name", "created_at")
    search_fields = ("name",)
    ordering = ("name",)
    change_readonly_fields = ("parameters",)


@admin.register(DataGrouping)
class DataGroupingAdmin(OpsModelAdmin):
    list_display = ("name", "instrument_module", "updated_at")
    list_filter = ("instrument_module__instrument",)
    search_fields = ("name", "description")
    list_select_related = ("instrument_module__instrument",)
    ordering = ("name",)


class StepInline(OpsTabularInline):
    """The steps of a pipeline, in order; dependencies and resources on each step's page."""

    model = ReductionStep
    fields = ("step_order", "name", "software", "software_version", "version_policy", "config")
    ordering = ("step_order",)


@admin.register(Pipeline)
class PipelineAdmin(OpsModelAdmin):
    list_display = (
        "name",
        "trigger_type",
        "enabled",
        "priority",
        "data_grouping",
        "processing_location",
        "updated_at",
    )
    list_filter = ("enabled", "trigger_type", "processing_location")
    search_fields = ("name", "description", "data_grouping__name")
    list_select_related = ("data_grouping", "processing_location__site")
    ordering = ("-priority", "name")
    raw_id_fields = ("created_by",)
    inlines = (StepInline,)
    actions = (enable_pipelines, disable_pipelines)


class RunOfStepInline(ReadOnlyTabularInline):
    model = ExecutedReductionStep
    fields = ("sub_group_key", "status", "triggered_by", "retry_count", "hpc_job_id", "created_at")
    readonly_fields = fields
    select_related = ("reduction_step__pipeline",)
    verbose_name_plural = "runs (newest first, first 50)"


@admin.register(ReductionStep)
class ReductionStepAdmin(OpsModelAdmin):
    list_display = (
        "name",
        "pipeline",
        "step_order",
        "software",
        "software_version",
        "version_policy",
        "cooldown_seconds",
        "max_retries",
    )
    list_filter = ("pipeline", "version_policy", "software")
    search_fields = ("name", "pipeline__name", "software__name", "reduction_instrument")
    list_select_related = ("pipeline", "software", "software_version__software")
    ordering = ("pipeline__name", "step_order")
    filter_horizontal = ("depends_on",)
    inlines = (RunOfStepInline,)


class ProductOfRunInline(ReadOnlyTabularInline):
    model = DataProduct
    fields = (
        "product_type",
        "filename",
        "relative_path",
        "size_bytes_readable",
        "stale_since",
    )
    readonly_fields = fields
    verbose_name_plural = "products (newest first, first 50)"


@admin.register(ExecutedReductionStep)
class ExecutedReductionStepAdmin(OpsModelAdmin):
    """Runs. The status moves only through the workflow managers and the retry/cancel actions;
    job id, metrics and paths are written by the managers."""

    list_display = (
        "id",
        "reduction_step",
        "sub_group_key",
        "status",
        "triggered_by",
        "retry_count",
        "hpc_job_id",
        "parameter_set",
        "created_at",
        "finished_at",
    )
    list_filter = (
        "status",
        "triggered_by",
        "reduction_step__pipeline",
        "reduction_step__pipeline__processing_location",
    )
    search_fields = ("sub_group_key", "hpc_job_id", "failure_reason")
    list_select_related = ("reduction_step__pipeline", "parameter_set")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = (
        "reduction_step",
        "software_version",
        "parameter_set",
        "staging_job",
        "input_raw_packages",
        "input_products",
    )
    system_fields = (
        "hpc_job_id",
        "attempts",
        "exit_code",
        "wall_time_seconds",
        "cpu_hours",
        "peak_memory_gb",
        "failure_reason",
        "workspace_dir",
        "log_path",
        "submitted_at",
    )
    change_readonly_fields = ("reduction_step", "sub_group_key", "sub_group_values")
    inlines = (ProductOfRunInline,)
    actions = (retry_failed_runs, cancel_runs, recover_leases_now)


@admin.register(DataProduct)
class DataProductAdmin(OpsModelAdmin):
    """Products. What a run produced and its checksum are facts once registered."""

    list_display = (
        "filename",
        "product_type",
        "produced_by",
        "size_bytes_readable",
        "parameter_version",
        "stale_since",
        "created_at",
    )
    list_filter = (
        "product_type",
        ("stale_since", admin.EmptyFieldListFilter),
        "produced_by__reduction_step__pipeline",
    )
    search_fields = ("filename", "relative_path", "checksum")
    list_select_related = (
        "produced_by__reduction_step__pipeline",
        "produced_by__parameter_set",
    )
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    raw_id_fields = ("produced_by",)
    change_readonly_fields = (
        "produced_by",
        "relative_path",
        "size_bytes",
        "checksum",
        "checksum_algorithm",
    )
    readonly_fields = ("parameter_version",)
    inlines = (CopyInline,)

    @admin.display(description="parameters", ordering="produced_by__parameter_set__number")
    def parameter_version(self, product: DataProduct) -> str:
        """The instrument parameter set whose script made this product ("-" when none)."""
        parameter_set = product.produced_by.parameter_set
        return str(parameter_set) if parameter_set else "-"
