"""Prime-Cam parameters. Field names are the template keys; ``initial`` is the default."""

from __future__ import annotations

from typing import Any

from django import forms

from reduction.forms import FloatField, IntegerRangeListField, ReductionForm

MODULE_CHOICES = [("280", "280 GHz"), ("350", "350 GHz")]


class PrimeCamForm(ReductionForm):
    sections = [
        ("Modules", ["modules", "calibration_jy_per_unit"]),
        ("Time-stream cleaning", ["flag_detectors", "common_mode", "highpass_hz", "despike_sigma"]),
        ("Map", ["pixel_size_arcsec", "map_size_arcsec"]),
    ]

    modules = forms.MultipleChoiceField(
        label="Modules",
        choices=MODULE_CHOICES,
        initial=["280", "350"],
        widget=forms.CheckboxSelectMultiple,
        help_text="time streams of other modules are skipped",
    )
    calibration_jy_per_unit = FloatField(
        label="Calibration",
        min_value=1e-9,
        max_value=1e9,
        initial=1.0,
        help_text="Jy/beam per raw detector unit",
    )
    flag_detectors = IntegerRangeListField(
        label="Flagged detectors",
        required=False,
        min_item=0,
        max_item=99999,
        initial="",
        help_text="detector indices to drop, e.g. 4,100-120",
    )
    common_mode = forms.BooleanField(
        label="Remove common mode", required=False, initial=True, help_text="per-sample median"
    )
    highpass_hz = FloatField(
        label="High-pass cut-off",
        min_value=0,
        max_value=10,
        initial=0.1,
        help_text="Hz; 0 disables the filter",
    )
    despike_sigma = FloatField(
        label="Despike threshold", min_value=2, max_value=100, initial=5.0, help_text="sigma"
    )
    pixel_size_arcsec = FloatField(
        label="Map pixel", min_value=0.5, max_value=120, initial=6.0, help_text="arcsec"
    )
    map_size_arcsec = FloatField(
        label="Map size", min_value=10, max_value=36000, initial=600.0, help_text="arcsec square"
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        pixel, size = data.get("pixel_size_arcsec"), data.get("map_size_arcsec")
        if pixel is not None and size is not None and size < 2 * pixel:
            self.add_error("map_size_arcsec", "the map must be at least two pixels wide")
        return data
