"""Admin for reduction software, groupings, pipelines, steps, runs and products."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from pipelines.models import (
    Campaign,
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
    actions = (enable_pipelines, disable_pipelines, "trigger_now")  # trigger_now: campaigns topic

    @admin.action(description="Trigger now (MANUAL pipelines)")
    def trigger_now(self, request: HttpRequest, queryset: Any) -> None:
        """Campaigns topic (issue 12): ``manage.py trigger`` from the admin, through
        ``pipeline_trigger``; pipelines of another trigger type are named and left alone."""
        from django.contrib import messages

        from pipelines.models import TriggerType
        from pipelines.services.triggers import TriggerError, pipeline_trigger

        created = 0
        refused: list[str] = []
        for pipeline in queryset[:100]:
            if pipeline.trigger_type != TriggerType.MANUAL:
                refused.append(f"{pipeline.name} ({pipeline.get_trigger_type_display()})")
                continue
            try:
                decisions = pipeline_trigger(pipeline, user=request.user)
            except TriggerError as exc:
                refused.append(f"{pipeline.name} ({'; '.join(exc.messages)})")
                continue
            created += sum(1 for d in decisions if d.run is not None)
        self.message_user(request, f"Triggered: {created} run(s) created.", messages.SUCCESS)
        if refused:
            self.message_user(
                request,
                "Not triggered (only MANUAL pipelines are; the trigger manager runs the others): "
                + ", ".join(refused[:10]),
                messages.WARNING,
            )


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
            "stages_raw_data",
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
        "replaces",  # campaigns topic: the run a reprocessing run replaces
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
        "superseded_at",  # campaigns topic
        "created_at",
    )
    list_filter = (
        "product_type",
        ("stale_since", admin.EmptyFieldListFilter),
        ("superseded_at", admin.EmptyFieldListFilter),  # campaigns topic
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
    # staleness: campaigns topic (issue 12); the "why" sentence says the reason too.
    readonly_fields = ("parameter_version", "stale_since", "stale_reason", "superseded_by",
                       "superseded_at")  # fmt: skip
    inlines = (CopyInline,)

    @admin.display(description="parameters", ordering="produced_by__parameter_set__number")
    def parameter_version(self, product: DataProduct) -> str:
        """The instrument parameter set whose script made this product ("-" when none)."""
        parameter_set = product.produced_by.parameter_set
        return str(parameter_set) if parameter_set else "-"


# --- Campaigns (issue 12, helper "campaigns"): backfills and reprocessing -------------------------
class RunOfCampaignInline(ReadOnlyTabularInline):
    model = ExecutedReductionStep
    fk_name = "campaign"
    fields = ("reduction_step", "sub_group_key", "status", "replaces", "created_at")
    readonly_fields = fields
    verbose_name_plural = "runs (newest first, first 50)"


@admin.register(Campaign)
class CampaignAdmin(OpsModelAdmin):
    """Campaigns are made by ``manage.py backfill`` / ``reprocess``; here they are watched,
    throttled (``max_active``, read by the workflow manager at every claim) and cancelled."""

    list_display = (
        "id",
        "kind",
        "state",
        "progress",
        "max_active",
        "requested_by",
        "reason",
        "created_at",
        "finished_at",
    )
    list_filter = ("kind", "state")
    search_fields = ("reason", "requested_by")
    ordering = ("-created_at",)
    system_fields = (
        "parameters_key",
        "runs_created",
        "runs_active",
        "runs_completed",
        "runs_failed",
        "runs_cancelled",
        "waiting",
        "finished_at",
        "requested_by",
    )
    change_readonly_fields = ("kind", "parameters")
    raw_id_fields = ("created_by",)
    inlines = (RunOfCampaignInline,)
    actions = ("cancel_campaigns", "advance_campaigns")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # made by the commands, which plan them

    @admin.display(description="progress")
    def progress(self, campaign: Campaign) -> str:
        return (
            f"{campaign.runs_completed}/{campaign.runs_created} completed, "
            f"{campaign.runs_active} active, {campaign.runs_failed} failed, "
            f"{campaign.waiting} later"
        )

    @admin.action(description="Cancel (and cancel their runs not admitted yet)")
    def cancel_campaigns(self, request: HttpRequest, queryset: Any) -> None:
        from django.contrib import messages

        from pipelines.services.campaigns import campaign_cancel
        from pipelines.services.states import TransitionError

        from .base import admin_actor

        done, skipped = 0, []
        for campaign in queryset[:100]:
            try:
                campaign_cancel(campaign, actor=admin_actor(request))
                done += 1
            except TransitionError:
                skipped.append(str(campaign.pk))
        self.message_user(request, f"Cancelled {done} campaign(s).", messages.SUCCESS)
        if skipped:
            self.message_user(
                request, f"Not active, left as they were: {', '.join(skipped)}", messages.WARNING
            )

    @admin.action(description="Advance now (create the runs that are due)")
    def advance_campaigns(self, request: HttpRequest, queryset: Any) -> None:
        from django.contrib import messages

        from pipelines.services.campaigns import campaign_advance

        from .base import admin_actor

        created = 0
        for campaign in queryset[:100]:
            created += campaign_advance(campaign, actor=admin_actor(request)).created
        self.message_user(request, f"Created {created} run(s).", messages.SUCCESS)
