"""Reduction pipelines: software, groupings, pipelines, steps, runs and products (workflow
manager §2)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
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


# --- Validation of groupings, pipelines and steps (workflow engine, helper "grouping") ----------
# Resource requirement key -> (lowest, highest, what it is). Backends translate these (SLURM
# --cpus-per-task/--mem/--time, Kubernetes requests = limits); the bounds keep a typo such as
# memory_gb 16000 from reaching a scheduler, and 1 minute is the shortest time any accepts.
RESOURCE_LIMITS: dict[str, tuple[float, float, str]] = {
    "cpu": (1, 1024, "an integer number of cores from 1 to 1024"),
    "memory_gb": (0, 65536, "a number of GB above 0, at most 65536"),
    "time_hours": (1 / 60, 720, "a number of hours from 1/60 (one minute) to 720"),
}


def validate_resource_requirements(value: object) -> dict:
    """A step's resource requirements, or ValidationError naming the bad key. ``{}`` leaves
    every resource to the backend's default; unknown keys are refused (not silently ignored)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(
            f'resource requirements are an object such as {{"cpu": 4, "memory_gb": 16, '
            f'"time_hours": 2}}, not {value!r}'
        )
    errors = []
    for key, amount in value.items():
        if key not in RESOURCE_LIMITS:
            errors.append(f"unknown resource {key!r}; known: {', '.join(RESOURCE_LIMITS)}")
            continue
        low, high, words = RESOURCE_LIMITS[key]
        is_number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
        if key == "cpu":
            ok = isinstance(amount, int) and not isinstance(amount, bool) and low <= amount <= high
        elif key == "memory_gb":
            ok = is_number and math.isfinite(amount) and low < amount <= high
        else:
            ok = is_number and math.isfinite(amount) and low <= amount <= high
        if not ok:
            errors.append(f"{key} must be {words}, not {amount!r}")
    if errors:
        raise ValidationError(errors)
    return value


# The @-aliases croniter understands; a due time is a minute, so only 5-field expressions.
_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def validate_cron_expression(expression: object) -> str:
    """A 5-field cron expression (or an @-alias such as ``@daily``) that croniter accepts and
    that fires at least once (``0 0 30 2 *`` never does); ValidationError otherwise."""
    from croniter import CroniterError, croniter

    if not isinstance(expression, str) or not expression.strip():
        raise ValidationError(f'a cron expression such as "0 3 * * *" is text, not {expression!r}')
    text = expression.strip()
    fields = text.split()
    if not (text in _CRON_ALIASES or len(fields) == 5) or not croniter.is_valid(text):
        raise ValidationError(
            f"{expression!r} is not a cron expression: use 5 fields (minute hour day-of-month "
            f'month day-of-week, e.g. "0 3 * * *" for 03:00 every day) or one of '
            f"{', '.join(_CRON_ALIASES)}"
        )
    try:
        croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterError as exc:
        raise ValidationError(f"{expression!r} never fires ({exc})") from None
    return text


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

    def clean(self) -> None:
        # Unknown tables, columns, operators and values of the wrong type are refused here, so
        # the admin and every service calling full_clean() report them naming the rule; the
        # rules are stored normalised (canonical table names).
        from pipelines.grouping import validate_filter_rules

        try:
            self.filter_rules = validate_filter_rules(self.filter_rules)
        except ValidationError as exc:
            raise ValidationError({"filter_rules": exc.messages}) from None


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
        self.trigger_config = validate_trigger_config(self.trigger_type, self.trigger_config)


def validate_trigger_config(trigger_type: str, config: object) -> dict:
    """The trigger configuration for ``trigger_type``, or ValidationError (on the
    ``trigger_config`` field): CRON takes exactly ``{"cron": "<5-field expression>"}``;
    CONTINUOUS and MANUAL take no configuration (``{}``), so a cron left on a pipeline switched
    to CONTINUOUS is refused rather than silently ignored."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValidationError({"trigger_config": f"an object such as {{}}, not {config!r}"})
    if trigger_type == TriggerType.CRON:
        unknown = sorted(set(config) - {"cron"})
        if unknown:
            raise ValidationError(
                {
                    "trigger_config": f"unknown key(s) {', '.join(map(repr, unknown))}; "
                    'a CRON pipeline takes {"cron": "<expression>"}'
                }
            )
        if "cron" not in config:
            raise ValidationError(
                {
                    "trigger_config": 'a CRON pipeline needs {"cron": "<expression>"}, e.g. '
                    '{"cron": "0 3 * * *"}'
                }
            )
        try:
            return {"cron": validate_cron_expression(config["cron"])}
        except ValidationError as exc:
            raise ValidationError({"trigger_config": exc.messages}) from None
    if config:
        label = TriggerType(trigger_type).label if trigger_type in TriggerType.values else "This"
        what = "cron expression" if "cron" in config else "trigger configuration"
        raise ValidationError(
            {
                "trigger_config": f"a {label.upper()} pipeline takes no {what}: leave it {{}} "
                "(only CRON pipelines have a schedule)"
            }
        )
    return {}


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
    stages_raw_data = models.BooleanField(
        default=True,
        help_text="Stage the sub-group's raw packages into each run's input/ directory. Turn it "
        "off for a step that reads only its upstream steps' products (a combine step): its runs "
        "then wait for no staging job and hold no raw copies. A step without upstream steps "
        "always stages.",
    )

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
        from pipelines.grouping import validate_group_by
        from pipelines.services.pipelines import reduction_step_check_dependencies
        from reduction.instruments import INSTRUMENTS

        errors: dict[str, list[str]] = {}
        if self.reduction_instrument and self.reduction_instrument not in INSTRUMENTS:
            known = ", ".join(sorted(INSTRUMENTS))
            errors["reduction_instrument"] = [
                f"unknown instrument {self.reduction_instrument!r}; known: {known}"
            ]
        version = self.software_version if self.software_version_id else None
        if version is not None and self.software_id:
            if version.software_id != self.software_id:
                errors["software_version"] = [f"{version} is not a version of {self.software}"]
        elif self.version_policy == VersionPolicy.PINNED and not self.software_version_id:
            errors["software_version"] = ["a PINNED step needs the version it is pinned to"]
        try:
            self.group_by = validate_group_by(self.group_by)
        except ValidationError as exc:
            errors["group_by"] = exc.messages
        try:
            self.resource_requirements = validate_resource_requirements(self.resource_requirements)
        except ValidationError as exc:
            errors["resource_requirements"] = exc.messages
        else:
            # Campaigns topic (issue 12): after the shape check, the configured backend's own
            # limits (SLURM: what the partition offers), so a step asking for more than the
            # cluster can give is refused when it is saved, not when its first run is submitted.
            from pipelines.backends.base import get_backend

            try:
                get_backend().validate_resources(self.resource_requirements)
            except ValidationError as exc:
                errors["resource_requirements"] = exc.messages
        # depends_on is saved after the row (a many-to-many), so a form that edits it sets
        # ``pending_depends_on`` to the upstream steps it is about to save (the admin does);
        # otherwise the saved links are checked against this row's (possibly changed) pipeline.
        # Writers of links go through services.pipelines.reduction_step_set_dependencies.
        upstream = getattr(self, "pending_depends_on", None)
        if upstream is None and self.pk:
            upstream = list(self.depends_on.all())
        if self.pipeline_id and (upstream or self.pk):
            try:
                reduction_step_check_dependencies(self, upstream or [])
            except ValidationError as exc:
                errors.setdefault("depends_on", []).extend(exc.messages)
        if errors:
            raise ValidationError(errors)


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


# --- Campaigns (issue 12, helper "campaigns"): backfills and reprocessing -----------------------
class CampaignKind(models.TextChoices):
    BACKFILL = "backfill", "Backfill"
    REPROCESS = "reprocess", "Reprocessing"


class CampaignState(models.TextChoices):
    ACTIVE = "active", "Active"
    FINISHED = "finished", "Finished"
    CANCELLED = "cancelled", "Cancelled"


# A finished campaign reopens when it is run again and finds work it had not done (new data in
# its time range); a cancelled one stays cancelled (running the command again starts anew).
CAMPAIGN_TRANSITIONS: dict[str, set[str]] = {
    CampaignState.ACTIVE: {CampaignState.FINISHED, CampaignState.CANCELLED},
    CampaignState.FINISHED: {CampaignState.ACTIVE},
    CampaignState.CANCELLED: set(),
}


class Campaign(StatefulModel, TimeStamped):
    """A backfill or a reprocessing: who asked, why, what (``parameters``), how many of its runs
    may be in the workflow at once (``max_active``, enforced by the workflow manager's claim, so
    the throttle holds after the command has exited), and its progress. Its identity is
    ``kind`` + ``parameters``: running the same command again finds this row and resumes it
    (``parameters_key`` is their canonical hash; one live campaign per key)."""

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {"state": CAMPAIGN_TRANSITIONS}

    Kind = CampaignKind
    State = CampaignState

    kind = models.CharField(max_length=10, choices=CampaignKind.choices)
    state = models.CharField(
        max_length=10, choices=CampaignState.choices, default=CampaignState.ACTIVE
    )
    parameters = models.JSONField(default=dict, blank=True, help_text="what the campaign covers")
    parameters_key = models.CharField(max_length=64, editable=False)
    reason = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="campaigns",
    )
    # Who asked when there is no user row: "command:backfill by <os user>".
    requested_by = models.CharField(max_length=200, blank=True, default="")
    max_active = models.PositiveIntegerField(
        default=10, help_text="runs of this campaign admitted into the workflow at once"
    )
    # Progress, refreshed by campaign_advance (the command and the campaign manager's tick).
    runs_created = models.PositiveIntegerField(default=0)
    runs_active = models.PositiveIntegerField(default=0)
    runs_completed = models.PositiveIntegerField(default=0)
    runs_failed = models.PositiveIntegerField(default=0)
    runs_cancelled = models.PositiveIntegerField(default=0)
    waiting = models.PositiveIntegerField(
        default=0, help_text="sub-groups not started yet (throttled or waiting for upstream)"
    )
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "campaign"
        ordering = ["-created_at"]
        constraints = [
            choices_check("kind", CampaignKind, "campaign_kind_valid"),
            choices_check("state", CampaignState, "campaign_state_valid"),
            models.CheckConstraint(
                condition=models.Q(max_active__gte=1),
                name="campaign_max_active_positive",
                violation_error_message="A campaign admits at least one run at a time.",
            ),
            # Running the same command twice at once finds one campaign, never two.
            models.UniqueConstraint(
                fields=["kind", "parameters_key"],
                condition=models.Q(state__in=["active", "finished"]),
                name="campaign_one_live_per_parameters",
                violation_error_message="A campaign with these parameters already exists.",
            ),
        ]
        indexes = [
            # campaign manager: the active campaigns.
            models.Index(fields=["state", "created_at"], name="campaign_state_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display().lower()} campaign {self.pk}"


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
    # Campaigns (issue 12): the backfill or reprocessing that created this run (the workflow
    # manager admits at most campaign.max_active of its runs at once), and for a reprocessing
    # run the run whose (stale) products it replaces.
    campaign = models.ForeignKey(
        Campaign, on_delete=models.PROTECT, null=True, blank=True, related_name="runs"
    )
    replaces = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="replacements"
    )

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
    # Campaigns (issue 12): a reprocessing run's product that replaces this one. A superseded
    # product keeps its files, copies and lineage (nothing is deleted); it is history.
    superseded_by = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="supersedes"
    )
    superseded_at = models.DateTimeField(null=True, blank=True)

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
