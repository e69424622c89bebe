"""Observatory hierarchy, planning and execution (ops-db §1)."""

from __future__ import annotations

import uuid
from typing import ClassVar

from django.db import models

from .base import StatefulModel, TimeStamped, choices_check


class Observatory(TimeStamped):
    name = models.CharField(max_length=200, unique=True)
    short_name = models.SlugField(max_length=50, unique=True)
    description = models.TextField(blank=True, default="")

    class Meta:
        db_table = "observatory"
        verbose_name_plural = "observatories"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Telescope(TimeStamped):
    observatory = models.ForeignKey(
        Observatory, on_delete=models.PROTECT, related_name="telescopes"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    site_description = models.CharField(max_length=200, blank=True, default="")
    latitude_deg = models.FloatField(null=True, blank=True)
    longitude_deg = models.FloatField(null=True, blank=True)
    altitude_m = models.FloatField(null=True, blank=True)

    class Meta:
        db_table = "telescope"
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["observatory", "name"],
                name="telescope_unique_name",
                violation_error_message=(
                    "This observatory already has a telescope with this name."
                ),
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Instrument(TimeStamped):
    telescope = models.ForeignKey(Telescope, on_delete=models.PROTECT, related_name="instruments")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    instrument_type = models.CharField(
        max_length=50, blank=True, default="", help_text="e.g. heterodyne, camera, spectrometer"
    )
    # False while the instrument is being commissioned or serviced; ingest for it is refused.
    available = models.BooleanField(default=True)

    class Meta:
        db_table = "instrument"
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["telescope", "name"],
                name="instrument_unique_name",
                violation_error_message=(
                    "This telescope already has an instrument with this name."
                ),
            ),
        ]

    def __str__(self) -> str:
        return self.name


class InstrumentModule(TimeStamped):
    """The part of an instrument that writes data; every raw file belongs to exactly one."""

    instrument = models.ForeignKey(Instrument, on_delete=models.PROTECT, related_name="modules")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    pixels = models.PositiveIntegerField(null=True, blank=True)
    freq_min_ghz = models.FloatField(null=True, blank=True)
    freq_max_ghz = models.FloatField(null=True, blank=True)

    class Meta:
        db_table = "instrument_module"
        ordering = ["instrument__name", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["instrument", "name"],
                name="instrument_module_unique_name",
                violation_error_message="This instrument already has a module with this name.",
            ),
            models.CheckConstraint(
                condition=models.Q(freq_min_ghz__isnull=True)
                | models.Q(freq_max_ghz__isnull=True)
                | models.Q(freq_min_ghz__lte=models.F("freq_max_ghz")),
                name="instrument_module_freq_order",
                violation_error_message=(
                    "The minimum frequency must not be above the maximum frequency."
                ),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instrument.name}/{self.name}"


class InstrumentModuleConfiguration(TimeStamped):
    instrument_module = models.ForeignKey(
        InstrumentModule, on_delete=models.PROTECT, related_name="configurations"
    )
    name = models.CharField(max_length=200)
    config = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "instrument_module_configuration"
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["instrument_module", "name"],
                name="instrument_module_configuration_unique",
                violation_error_message=(
                    "This instrument module already has a configuration with this name."
                ),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instrument_module} {self.name}"


class ObservingProgram(TimeStamped):
    name = models.CharField(max_length=200, unique=True)
    short_name = models.SlugField(max_length=50, unique=True)
    description = models.TextField(blank=True, default="")
    principal_investigator = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        db_table = "observing_program"
        ordering = ["short_name"]

    def __str__(self) -> str:
        return self.short_name


class SubObservingProgram(TimeStamped):
    observing_program = models.ForeignKey(
        ObservingProgram, on_delete=models.PROTECT, related_name="sub_programs"
    )
    name = models.CharField(max_length=200)
    short_name = models.SlugField(max_length=50)

    class Meta:
        db_table = "sub_observing_program"
        ordering = ["short_name"]
        constraints = [
            models.UniqueConstraint(
                fields=["observing_program", "short_name"],
                name="sub_observing_program_unique",
                violation_error_message=(
                    "This observing program already has a sub-program with this short name."
                ),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.observing_program.short_name}/{self.short_name}"


class SourceType(models.TextChoices):
    FIXED = "fixed", "Fixed source"
    SOLAR_SYSTEM = "solar_system", "Solar-system object"
    CONSTANT_ELEVATION = "constant_elevation", "Constant-elevation source"


class Source(TimeStamped):
    """An astronomical target. One table for the three ops-db kinds; the columns a kind needs
    are enforced by a check constraint."""

    SourceType = SourceType

    name = models.CharField(max_length=200, unique=True)
    source_type = models.CharField(
        max_length=24, choices=SourceType.choices, default=SourceType.FIXED
    )
    # Fixed sources: ICRS coordinates.
    ra_deg = models.FloatField(null=True, blank=True)
    dec_deg = models.FloatField(null=True, blank=True)
    frame = models.CharField(max_length=20, blank=True, default="icrs")
    # Solar-system objects: the name an ephemeris service knows.
    ephemeris_name = models.CharField(max_length=100, blank=True, default="")
    # Constant-elevation sources: survey strips.
    elevation_deg = models.FloatField(null=True, blank=True)
    az_min_deg = models.FloatField(null=True, blank=True)
    az_max_deg = models.FloatField(null=True, blank=True)

    class Meta:
        db_table = "source"
        ordering = ["name"]
        constraints = [
            choices_check("source_type", SourceType, "source_type_valid"),
            models.CheckConstraint(
                condition=~models.Q(source_type="fixed")
                # NULL passes a CHECK, so the coordinates must be required explicitly.
                | models.Q(
                    ra_deg__isnull=False,
                    dec_deg__isnull=False,
                    ra_deg__gte=0,
                    ra_deg__lt=360,
                    dec_deg__gte=-90,
                    dec_deg__lte=90,
                ),
                name="source_fixed_has_coordinates",
                violation_error_message=(
                    "A fixed source needs RA (0 to 360 degrees) and Dec (-90 to 90 degrees)."
                ),
            ),
            models.CheckConstraint(
                condition=~models.Q(source_type="solar_system") | ~models.Q(ephemeris_name=""),
                name="source_solar_system_has_ephemeris",
                violation_error_message="A solar-system object needs an ephemeris name.",
            ),
            models.CheckConstraint(
                condition=~models.Q(source_type="constant_elevation")
                | models.Q(
                    elevation_deg__isnull=False, elevation_deg__gte=0, elevation_deg__lte=90
                ),
                name="source_constant_elevation_has_elevation",
                violation_error_message=(
                    "A constant-elevation source needs an elevation between 0 and 90 degrees."
                ),
            ),
        ]

    def __str__(self) -> str:
        return self.name


class ObsMode(TimeStamped):
    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True, default="")

    class Meta:
        db_table = "obs_mode"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Line(TimeStamped):
    """A spectral line or continuum setup an obs unit tunes to (``line_id`` in the ops-db)."""

    name = models.CharField(max_length=50, unique=True, help_text='e.g. "CO43"')
    species = models.CharField(max_length=50, blank=True, default="")
    transition = models.CharField(max_length=50, blank=True, default="")
    rest_frequency_ghz = models.FloatField(null=True, blank=True)

    class Meta:
        db_table = "line"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ObsUnit(TimeStamped):
    """A schedulable unit of observation."""

    name = models.CharField(max_length=200, unique=True)
    observing_program = models.ForeignKey(
        ObservingProgram, on_delete=models.PROTECT, related_name="obs_units"
    )
    sub_observing_program = models.ForeignKey(
        SubObservingProgram,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="obs_units",
    )
    source = models.ForeignKey(
        Source, on_delete=models.PROTECT, null=True, blank=True, related_name="obs_units"
    )
    obs_mode = models.ForeignKey(
        ObsMode, on_delete=models.PROTECT, null=True, blank=True, related_name="obs_units"
    )
    line = models.ForeignKey(
        Line, on_delete=models.PROTECT, null=True, blank=True, related_name="obs_units"
    )
    instrument_module_configurations = models.ManyToManyField(
        InstrumentModuleConfiguration,
        blank=True,
        related_name="obs_units",
        db_table="obs_unit_instrument_module_configuration",
    )
    priority = models.IntegerField(default=0)
    requested_time_s = models.PositiveIntegerField(default=0)
    active = models.BooleanField(default=True)

    class Meta:
        db_table = "obs_unit"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ObsStatus(models.TextChoices):
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    ABORTED = "aborted", "Aborted"


class ExecutedObsUnit(StatefulModel, TimeStamped):
    """One execution of an obs unit (a "scan"). The UUID may be generated by the telescope
    while it is offline, so it is the primary key and a repeated start is recognised."""

    ObsStatus = ObsStatus

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {
        "status": {
            ObsStatus.RUNNING: {ObsStatus.COMPLETED, ObsStatus.FAILED, ObsStatus.ABORTED},
            ObsStatus.COMPLETED: set(),
            ObsStatus.FAILED: set(),
            ObsStatus.ABORTED: set(),
        }
    }

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    obs_unit = models.ForeignKey(ObsUnit, on_delete=models.PROTECT, related_name="executions")
    start_time = models.DateTimeField()
    end_time = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=ObsStatus.choices, default=ObsStatus.RUNNING)
    instrument_module_configurations = models.ManyToManyField(
        InstrumentModuleConfiguration,
        blank=True,
        related_name="executions",
        db_table="executed_obs_unit_instrument_module_configuration",
    )
    conditions = models.JSONField(default=dict, blank=True, help_text="weather, pwv, elevation")
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        db_table = "executed_obs_unit"
        ordering = ["-start_time"]
        constraints = [
            choices_check("status", ObsStatus, "executed_obs_unit_status_valid"),
            models.CheckConstraint(
                condition=models.Q(end_time__isnull=True)
                | models.Q(end_time__gte=models.F("start_time")),
                name="executed_obs_unit_end_after_start",
                violation_error_message="A scan cannot end before it starts.",
            ),
        ]
        indexes = [
            # Dashboard and API: recent scans of an obs unit.
            models.Index(fields=["obs_unit", "-start_time"], name="eou_obs_unit_start_idx"),
            models.Index(fields=["-start_time"], name="eou_start_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.obs_unit.name} @ {self.start_time:%Y-%m-%d %H:%M}"
