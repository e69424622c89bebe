"""Admin for the observatory hierarchy, planning and executed obs units."""

from __future__ import annotations

from django.contrib import admin

from pipelines.models import (
    ExecutedObsUnit,
    Instrument,
    InstrumentModule,
    InstrumentModuleConfiguration,
    Line,
    Observatory,
    ObservingProgram,
    ObsMode,
    ObsUnit,
    RawDataPackage,
    Source,
    SubObservingProgram,
    Telescope,
)

from .base import OpsModelAdmin, OpsTabularInline, ReadOnlyTabularInline


class TelescopeInline(OpsTabularInline):
    model = Telescope
    fields = ("name", "site_description", "latitude_deg", "longitude_deg", "altitude_m")


@admin.register(Observatory)
class ObservatoryAdmin(OpsModelAdmin):
    list_display = ("name", "short_name", "created_at")
    search_fields = ("name", "short_name")
    ordering = ("name",)
    inlines = (TelescopeInline,)


@admin.register(Telescope)
class TelescopeAdmin(OpsModelAdmin):
    list_display = ("name", "observatory", "site_description", "altitude_m")
    list_filter = ("observatory",)
    search_fields = ("name", "observatory__name", "site_description")
    list_select_related = ("observatory",)
    ordering = ("name",)


class InstrumentModuleInline(OpsTabularInline):
    model = InstrumentModule
    fields = ("name", "pixels", "freq_min_ghz", "freq_max_ghz", "description")


@admin.register(Instrument)
class InstrumentAdmin(OpsModelAdmin):
    list_display = ("name", "telescope", "instrument_type", "available")
    list_filter = ("available", "instrument_type", "telescope")
    search_fields = ("name", "instrument_type", "telescope__name")
    list_select_related = ("telescope",)
    ordering = ("name",)
    inlines = (InstrumentModuleInline,)


@admin.register(InstrumentModule)
class InstrumentModuleAdmin(OpsModelAdmin):
    list_display = ("name", "instrument", "pixels", "freq_min_ghz", "freq_max_ghz")
    list_filter = ("instrument",)
    search_fields = ("name", "instrument__name")
    list_select_related = ("instrument",)
    ordering = ("instrument__name", "name")


@admin.register(InstrumentModuleConfiguration)
class InstrumentModuleConfigurationAdmin(OpsModelAdmin):
    list_display = ("name", "instrument_module", "updated_at")
    list_filter = ("instrument_module__instrument",)
    search_fields = ("name", "instrument_module__name", "instrument_module__instrument__name")
    list_select_related = ("instrument_module__instrument",)
    ordering = ("name",)


class SubObservingProgramInline(OpsTabularInline):
    model = SubObservingProgram
    fields = ("short_name", "name")


@admin.register(ObservingProgram)
class ObservingProgramAdmin(OpsModelAdmin):
    list_display = ("short_name", "name", "principal_investigator")
    search_fields = ("short_name", "name", "principal_investigator")
    ordering = ("short_name",)
    inlines = (SubObservingProgramInline,)


@admin.register(SubObservingProgram)
class SubObservingProgramAdmin(OpsModelAdmin):
    list_display = ("short_name", "name", "observing_program")
    list_filter = ("observing_program",)
    search_fields = ("short_name", "name", "observing_program__short_name")
    list_select_related = ("observing_program",)
    ordering = ("observing_program__short_name", "short_name")


@admin.register(Source)
class SourceAdmin(OpsModelAdmin):
    list_display = ("name", "source_type", "ra_deg", "dec_deg", "ephemeris_name", "elevation_deg")
    list_filter = ("source_type", "frame")
    search_fields = ("name", "ephemeris_name")
    ordering = ("name",)


@admin.register(ObsMode)
class ObsModeAdmin(OpsModelAdmin):
    list_display = ("name", "description")
    search_fields = ("name",)
    ordering = ("name",)


@admin.register(Line)
class LineAdmin(OpsModelAdmin):
    list_display = ("name", "species", "transition", "rest_frequency_ghz")
    search_fields = ("name", "species", "transition")
    ordering = ("name",)


@admin.register(ObsUnit)
class ObsUnitAdmin(OpsModelAdmin):
    list_display = (
        "name",
        "observing_program",
        "sub_observing_program",
        "source",
        "obs_mode",
        "line",
        "priority",
        "active",
    )
    list_filter = ("active", "observing_program", "obs_mode", "line")
    search_fields = ("name", "source__name", "observing_program__short_name")
    list_select_related = (
        "observing_program",
        "sub_observing_program__observing_program",
        "source",
        "obs_mode",
        "line",
    )
    filter_horizontal = ("instrument_module_configurations",)
    ordering = ("name",)


class RawDataPackageOfScanInline(ReadOnlyTabularInline):
    model = RawDataPackage
    fields = ("name", "instrument_module", "status", "state", "size_readable", "file_count")
    readonly_fields = fields
    select_related = ("instrument_module__instrument",)
    verbose_name_plural = "raw data packages (newest first, first 50)"


@admin.register(ExecutedObsUnit)
class ExecutedObsUnitAdmin(OpsModelAdmin):
    """Scans. Big table: no full counts, and the obs unit is picked by id."""

    list_display = ("id", "obs_unit", "status", "start_time", "end_time")
    list_filter = ("status",)
    search_fields = ("obs_unit__name",)
    list_select_related = ("obs_unit",)
    date_hierarchy = "start_time"
    ordering = ("-start_time",)
    show_full_result_count = False
    raw_id_fields = ("obs_unit",)
    # When the scan started names its files and packages; it never changes afterwards.
    change_readonly_fields = ("start_time",)
    filter_horizontal = ("instrument_module_configurations",)
    inlines = (RawDataPackageOfScanInline,)
