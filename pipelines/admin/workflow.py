"""Admin for reduction software, groupings, pipelines, steps, runs and products."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

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
from pipelines.services.pipelines import reduction_step_set_dependencies

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


def _filter_rules_help() -> str:
    from pipelines.grouping import OPERATORS, TABLES

    return (
        'A list of rules, all of which a package must match, e.g. [{"table": "Source", '
        '"column": "name", "operator": "eq", "value": "NGC253"}, {"table": "RawDataPackage", '
        '"column": "metadata", "json_path": "observation.frequency_ghz", "operator": "gt", '
        f'"value": 400}}]. Tables: {", ".join(TABLES)}. Operators: {", ".join(OPERATORS)} '
        "(like: % and _, case-sensitive). [] selects every package."
    )


class DataGroupingForm(forms.ModelForm):
    class Meta:
        model = DataGrouping
        fields = ("name", "description", "filter_rules", "instrument_module")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "filter_rules" in self.fields:
            self.fields["filter_rules"].help_text = _filter_rules_help()


@admin.register(DataGrouping)
class DataGroupingAdmin(OpsModelAdmin):
    """Groupings. ``DataGrouping.clean`` refuses invalid rules naming the rule; the change page
    previews what the rules select (grouping topic: pipelines/grouping.py)."""

    form = DataGroupingForm

    list_display = ("name", "instrument_module", "updated_at")
    list_filter = ("instrument_module__instrument",)
    search_fields = ("name", "description")
    list_select_related = ("instrument_module__instrument",)
    ordering = ("name",)
    readonly_fields = ("preview",)

    @admin.display(description="preview")
    def preview(self, grouping: DataGrouping) -> str:
        """How many packages the saved rules select, and into how many sub-groups each step
        using this grouping splits them (one aggregate query per step, no rows loaded)."""
        from pipelines.grouping import preview

        if grouping.pk is None:
            return "Save the grouping to preview what it selects."
        try:
            total = sum(entry["count"] for entry in preview(grouping, []))
            steps = ReductionStep.objects.filter(pipeline__data_grouping=grouping).select_related(
                "pipeline"
            )[:20]
            lines = [
                (
                    str(step),
                    ", ".join(step.group_by) or "all together",
                    len(preview(grouping, step.group_by)),
                )
                for step in steps
            ]
        except ValidationError as exc:
            return "; ".join(exc.messages)
        rows = format_html_join("", "<li>{} by {}: {} sub-group(s)</li>", lines)
        return format_html("{} matching package(s)<ul>{}</ul>", total, rows)


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


class ReductionStepForm(forms.ModelForm):
    """Step form: the upstream steps it is about to save are handed to ``ReductionStep.clean``
    (``pending_depends_on``), which refuses cycles and links across pipelines naming the steps;
    the admin then saves them through ``reduction_step_set_dependencies`` (grouping topic)."""

    class Meta:
        model = ReductionStep
        fields = (
            "pipeline",
            "name",
            "step_order",
            "depends_on",
            "group_by",
            "cooldown_seconds",
            "resource_requirements",
            "max_retries",
            "software",
            "software_version",
            "version_policy",
            "config",
            "reduction_instrument",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields.get("depends_on")
        if field is not None and self.instance.pk:
            # Offer only steps this one may depend on: the other steps of its pipeline.
            field.queryset = field.queryset.filter(  # type: ignore[attr-defined]
                pipeline_id=self.instance.pipeline_id
            ).exclude(pk=self.instance.pk)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or self.cleaned_data
        if "depends_on" in cleaned:
            self.instance.pending_depends_on = list(cleaned["depends_on"])
        return cleaned


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
    form = ReductionStepForm

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        # The links go through the service (pipeline lock + the same checks), not save_m2m.
        upstream = form.cleaned_data.pop("depends_on", None)
        super().save_related(request, form, formsets, change)
        if upstream is not None:
            reduction_step_set_dependencies(form.instance, list(upstream))


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
