"""Reduction pipelines: software, groupings, pipelines, steps, runs and products (workflow
manager §2)."""

from __future__ import annotations

import re
from typing import ClassVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from .base import Claimable, StatefulModel, TimeStamped, choices_check
from .locations import DataLocation

_STEP_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def validate_step_name(value: str) -> None:
    # Step names become directory names under the pipeline workspace.
    if not _STEP_NAME.match(value or ""):
        raise ValidationError(f"{value!r}: use 1-64 of a-z, 0-9, '_', '-', '.' (no leading dot)")


class ReductionSoftware(TimeStamped):
    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True, default="")
    repository_url = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        db_table = "reduction_software"
        verbose_name_plural = "reduction software"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ReductionSoftwareVersion(TimeStamped):
    software = models.ForeignKey(
        ReductionSoftware, on_delete=models.PROTECT, related_name="versions"
    )
    version = models.CharField(max_length=50, help_text="semantic version, e.g. 1.4.2")
    image_ref = models.CharField(max_length=500, help_text="container image reference")
    sif_path = models.CharField(max_length=1000, blank=True, default="")
    # For the local backend and tests: a command run instead of a container.
    command = models.JSONField(default=list, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    changelog = models.TextField(blank=True, default="")

    class Meta:
        db_table = "reduction_software_version"
        ordering = ["software__name", "-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["software", "version"],
                name="reduction_software_version_unique",
                violation_error_message="This software already has this version.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.software.name} {self.version}"


class ReductionStepConfig(TimeStamped):
    """A named parameter set passed to a step through manifest.json. Treated as immutable:
    change it by creating a new row, so every run records exactly what it used."""

    name = models.CharField(max_length=100, unique=True)
    parameters = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "reduction_step_config"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class DataGrouping(TimeStamped):
    """What data a pipeline processes: filter rules over raw data packages (ANDed)."""

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True, default="")
    filter_rules = models.JSONField(default=list, blank=True)
    instrument_module = models.ForeignKey(
        "pipelines.InstrumentModule",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="data_groupings",
    )

    class Meta:
        db_table = "data_grouping"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class TriggerType(models.TextChoices):
    CONTINUOUS = "continuous", "Continuous"
    CRON = "cron", "Cron"
    MANUAL = "manual", "Manual"


class Pipeline(TimeStamped):
    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True, default="")
    data_grouping = models.ForeignKey(
        DataGrouping, on_delete=models.PROTECT, related_name="pipelines"
    )
    processing_location = models.ForeignKey(
        DataLocation,
        on_delete=models.PROTECT,
        related_name="pipelines",
        limit_choices_to={"location_type": DataLocation.LocationType.PROCESSING},
    )
    trigger_type = models.CharField(
        max_length=12, choices=TriggerType.choices, default=TriggerType.CONTINUOUS
    )
    trigger_config = models.JSONField(
        default=dict, blank=True, help_text='e.g. {"cron": "0 3 * * *"} for CRON'
    )
    enabled = models.BooleanField(default=True)
    priority = models.IntegerField(default=0, help_text="higher runs first")
    # CRON: the last due time the trigger manager evaluated, so each due time is evaluated once
    # however often the manager ticks (and however many managers tick).
    cron_last_due_at = models.DateTimeField(null=True, blank=True)
    # Incremental evaluation: packages archived after this instant have not been looked at yet.
    # The trigger manager advances it after each evaluation; a full re-evaluation (the safety
    # net) ignores it and is recorded in full_evaluation_at.
    trigger_watermark = models.DateTimeField(null=True, blank=True)
    full_evaluation_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="pipelines",
    )

    class Meta:
        db_table = "pipeline"
        ordering = ["-priority", "name"]
        constraints = [choices_check("trigger_type", TriggerType, "pipeline_trigger_type_valid")]
        indexes = [
            # trigger-manager: enabled pipelines of one processing location by priority.
            models.Index(
                fields=["processing_location", "enabled", "-priority"], name="pipeline_due_idx"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if (
            self.processing_location_id
            and self.processing_location.location_type != DataLocation.LocationType.PROCESSING
        ):
            raise ValidationError({"processing_location": "must be a PROCESSING location"})


class VersionPolicy(models.TextChoices):
    COMPATIBLE = "compatible", "Newest active version with the same major version"
    PINNED = "pinned", "Exactly the referenced version"
    LATEST = "latest", "Newest active version"


class ReductionStep(TimeStamped):
    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="steps")
    name = models.CharField(max_length=64, validators=[validate_step_name])
    step_order = models.PositiveIntegerField(default=0)
    depends_on = models.ManyToManyField(
        "self",
        symmetrical=False,
        blank=True,
        related_name="downstream_steps",
        db_table="reduction_step_depends_on",
    )
    group_by = models.JSONField(
        default=list,
        blank=True,
        help_text='[] = all data in one run; ["executed_obs_unit"] = per scan',
    )
    cooldown_seconds = models.PositiveIntegerField(default=60)
    resource_requirements = models.JSONField(
        default=dict, blank=True, help_text='e.g. {"cpu": 4, "memory_gb": 16, "time_hours": 2}'
    )
    max_retries = models.PositiveIntegerField(default=3)
    software = models.ForeignKey(ReductionSoftware, on_delete=models.PROTECT, related_name="steps")
    # The version a COMPATIBLE or PINNED policy refers to.
    software_version = models.ForeignKey(
        ReductionSoftwareVersion,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="steps",
    )
    version_policy = models.CharField(
        max_length=12, choices=VersionPolicy.choices, default=VersionPolicy.COMPATIBLE
    )
    config = models.ForeignKey(
        ReductionStepConfig, on_delete=models.PROTECT, null=True, blank=True, related_name="steps"
    )
    # Key in reduction.instruments.INSTRUMENTS whose rendered script this step runs.
    reduction_instrument = models.CharField(max_length=50, blank=True, default="")

    class Meta:
        db_table = "reduction_step"
        ordering = ["pipeline", "step_order"]
        constraints = [
            models.UniqueConstraint(
                fields=["pipeline", "name"],
                name="reduction_step_unique_name",
                violation_error_message="This pipeline already has a step with this name.",
            ),
            models.UniqueConstraint(
                fields=["pipeline", "step_order"],
                name="reduction_step_unique_order",
                violation_error_message="This pipeline already has a step at this position.",
            ),
            choices_check("version_policy", VersionPolicy, "reduction_step_version_policy_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline.name}/{self.name}"

    def clean(self) -> None:
        # The key must name a registered instrument, or no run of this step could render its
        # script. Checked here (not as a field validator) so the registry stays code, not schema.
        from reduction.instruments import INSTRUMENTS

        if self.reduction_instrument and self.reduction_instrument not in INSTRUMENTS:
            known = ", ".join(sorted(INSTRUMENTS))
            raise ValidationError(
                {
                    "reduction_instrument": f"unknown instrument {self.reduction_instrument!r}; "
                    f"known: {known}"
                }
            )


class RunStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    STAGING_DATA = "staging_data", "Staging data"
    SUBMITTED = "submitted", "Submitted"
    RUNNING = "running", "Running"
    COLLECTING_RESULTS = "collecting_results", "Collecting results"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


_R = RunStatus
# Workflow-manager §4.1, with its proposed additions: STAGING_DATA/SUBMITTED -> FAILED, and
# STAGING_DATA -> PENDING when the workflow manager that claimed the run lost its lease.
RUN_TRANSITIONS: dict[str, set[str]] = {
    _R.PENDING: {_R.STAGING_DATA, _R.CANCELLED},
    _R.STAGING_DATA: {_R.SUBMITTED, _R.FAILED, _R.PENDING},
    _R.SUBMITTED: {_R.RUNNING, _R.FAILED, _R.CANCELLED},
    _R.RUNNING: {_R.COLLECTING_RESULTS, _R.FAILED, _R.CANCELLED},
    _R.COLLECTING_RESULTS: {_R.COMPLETED, _R.FAILED},
    _R.FAILED: {_R.PENDING},
    _R.COMPLETED: set(),
    _R.CANCELLED: set(),
}
ACTIVE_RUN_STATUSES = (_R.PENDING, _R.STAGING_DATA, _R.SUBMITTED, _R.RUNNING, _R.COLLECTING_RESULTS)
CANCELLABLE_RUN_STATUSES = (_R.PENDING, _R.SUBMITTED, _R.RUNNING)


class TriggeredBy(models.TextChoices):
    AUTOMATIC = "automatic", "Trigger manager"
    MANUAL = "manual", "Manual"
    BACKFILL = "backfill", "Backfill"
    REPROCESS = "reprocess", "Reprocessing"
    RETRY = "retry", "Retry"


class ExecutedReductionStep(StatefulModel, TimeStamped, Claimable):
    """A run: one reduction step over one sub-group of data."""

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {"status": RUN_TRANSITIONS}

    TriggeredBy = TriggeredBy

    reduction_step = models.ForeignKey(ReductionStep, on_delete=models.PROTECT, related_name="runs")
    sub_group_key = models.CharField(max_length=200)
    sub_group_values = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=RunStatus.choices, default=RunStatus.PENDING)
    triggered_by = models.CharField(
        max_length=10, choices=TriggeredBy.choices, default=TriggeredBy.AUTOMATIC
    )
    software_version = models.ForeignKey(
        ReductionSoftwareVersion,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="runs",
    )
    config_snapshot = models.JSONField(default=dict, blank=True)
    # The instrument parameter set whose rendered script this run used (steps that name one).
    parameter_set = models.ForeignKey(
        "reduction.ParameterSet",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="runs",
    )
    staging_job = models.ForeignKey(
        "pipelines.StagingJob",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="runs",
    )
    input_raw_packages = models.ManyToManyField(
        "pipelines.RawDataPackage",
        blank=True,
        related_name="runs",
        db_table="executed_reduction_step_input_package",
    )
    input_products = models.ManyToManyField(
        "pipelines.DataProduct",
        blank=True,
        related_name="consumer_runs",
        db_table="executed_reduction_step_input_product",
    )
    hpc_job_id = models.CharField(max_length=100, blank=True, default="")
    attempts = models.JSONField(
        default=list, blank=True, help_text="one entry per attempt: job id, times, exit code"
    )
    exit_code = models.IntegerField(null=True, blank=True)
    wall_time_seconds = models.FloatField(null=True, blank=True)
    cpu_hours = models.FloatField(null=True, blank=True)
    peak_memory_gb = models.FloatField(null=True, blank=True)
    failure_reason = models.TextField(blank=True, default="")
    workspace_dir = models.CharField(max_length=1000, blank=True, default="")
    log_path = models.CharField(max_length=1000, blank=True, default="")
    # This attempt's directory: {processing root}/pipelines/{pipeline}/{sub group}/{id}-{attempt}.
    run_dir = models.CharField(max_length=1000, blank=True, default="")
    submitted_at = models.DateTimeField(null=True, blank=True)
    # Set in the same UPDATE that fails a run with no retries left (or an operator's failure):
    # until then a FAILED run still occupies its sub-group (the constraint below), so its retry
    # can never collide with a new run the trigger manager created meanwhile.
    failed_for_good = models.BooleanField(default=False)
    # Packages of the sub-group left out because their upstream run failed for good or was
    # cancelled: [{"package": id, "name": ..., "reason": ...}]; the manifest repeats it.
    excluded_inputs = models.JSONField(default=list, blank=True)

    class Meta:
        db_table = "executed_reduction_step"
        ordering = ["-created_at"]
        constraints = [
            choices_check("status", RunStatus, "executed_reduction_step_status_valid"),
            choices_check("triggered_by", TriggeredBy, "executed_reduction_step_trigger_valid"),
            # Never two runs occupying one (step, sub-group): active ones, and a FAILED one that
            # awaits its retry. The trigger manager relies on it.
            models.UniqueConstraint(
                fields=["reduction_step", "sub_group_key"],
                condition=(
                    models.Q(status__in=[s.value for s in ACTIVE_RUN_STATUSES])
                    | models.Q(status="failed", failed_for_good=False)
                ),
                name="executed_reduction_step_one_active_per_subgroup",
                violation_error_message=(
                    "This step already has an active run (or a failed run awaiting its retry) "
                    "for this sub-group."
                ),
            ),
        ]
        indexes = [
            # Managers: runs in a status, oldest first (workflow and result managers).
            models.Index(fields=["status", "created_at"], name="run_status_created_idx"),
            # trigger-manager gap and cooldown: latest runs of a step's sub-group.
            models.Index(
                fields=["reduction_step", "sub_group_key", "-created_at"],
                name="run_step_subgroup_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} {self.reduction_step} [{self.sub_group_key}] {self.status}"

    @property
    def is_terminal(self) -> bool:
        return self.status in (RunStatus.COMPLETED, RunStatus.CANCELLED) or (
            self.status == RunStatus.FAILED
            and (self.failed_for_good or self.retry_count >= self.max_retries)
        )

    @property
    def attempt(self) -> int:
        """1 for the first attempt; each retry (FAILED -> PENDING) adds one."""
        return self.retry_count + 1


class DataProductType(models.TextChoices):
    SCIENCE = "science", "Science"
    QA_METRIC = "qa_metric", "QA metric"
    PLOT = "plot", "Plot"
    STATISTICS = "statistics", "Statistics"
    LOG = "log", "Log"
    INTERMEDIATE = "intermediate", "Intermediate"


class DataProduct(TimeStamped):
    produced_by = models.ForeignKey(
        ExecutedReductionStep, on_delete=models.PROTECT, related_name="products"
    )
    product_type = models.CharField(max_length=16, choices=DataProductType.choices)
    filename = models.CharField(max_length=255)
    relative_path = models.CharField(max_length=1000)
    size_bytes = models.BigIntegerField(default=0)
    checksum = models.CharField(max_length=128)
    checksum_algorithm = models.CharField(
        max_length=16,
        choices=DataLocation.ChecksumAlgorithm.choices,
        default=DataLocation.ChecksumAlgorithm.SHA256,
    )
    quality_metrics = models.JSONField(default=dict, blank=True)
    # Set when the software version or instrument parameters that made it have changed.
    stale_since = models.DateTimeField(null=True, blank=True)
    stale_reason = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        db_table = "data_product"
        ordering = ["-created_at"]
        constraints = [
            choices_check("product_type", DataProductType, "data_product_type_valid"),
            models.CheckConstraint(
                condition=models.Q(size_bytes__gte=0),
                name="data_product_size_nonneg",
                violation_error_message="A product size cannot be negative.",
            ),
            models.UniqueConstraint(
                fields=["produced_by", "relative_path"],
                name="data_product_unique_path_per_run",
                violation_error_message="This run already produced a product at this path.",
            ),
        ]
        indexes = [
            models.Index(fields=["product_type", "-created_at"], name="data_product_type_idx"),
        ]

    def __str__(self) -> str:
        return self.relative_path
