"""CHAI parameters. Field names are the template keys; ``initial`` is the default."""

from __future__ import annotations

from typing import Any

from django import forms

from reduction.forms import (
    FloatField,
    FloatListField,
    IntegerField,
    IntegerRangeListField,
    ReductionForm,
)


class CHAIForm(ReductionForm):
    sections = [
        ("Modules", ["reduce_lfa", "lfa_line_ghz", "reduce_hfa", "hfa_line_ghz"]),
        ("Quality cuts", ["tsys_max_k", "spike_sigma", "flag_pixels"]),
        ("Baseline and binning", ["baseline_order", "line_window_kms", "velocity_resolution_kms"]),
    ]

    reduce_lfa = forms.BooleanField(label="Reduce LFA", required=False, initial=True)
    lfa_line_ghz = FloatField(
        label="LFA line rest frequency",
        min_value=455,
        max_value=495,
        initial=461.0407682,
        help_text="GHz, within the LFA band 455-495 GHz (default CO 4-3)",
    )
    reduce_hfa = forms.BooleanField(label="Reduce HFA", required=False, initial=True)
    hfa_line_ghz = FloatField(
        label="HFA line rest frequency",
        min_value=800,
        max_value=820,
        initial=806.651806,
        help_text="GHz, within the HFA band 800-820 GHz (default CO 7-6)",
    )
    tsys_max_k = FloatField(
        label="Maximum Tsys",
        min_value=10,
        max_value=50000,
        initial=3000.0,
        help_text="K; spectra with a higher system temperature are rejected",
    )
    spike_sigma = FloatField(
        label="Spike threshold",
        min_value=2,
        max_value=100,
        initial=6.0,
        help_text="channels further than this many sigma from their neighbours are flagged",
    )
    flag_pixels = IntegerRangeListField(
        label="Flagged pixels",
        required=False,
        min_item=0,
        max_item=63,
        initial="",
        help_text="array pixels 0-63 to ignore, e.g. 3,17-18",
    )
    baseline_order = IntegerField(
        label="Baseline polynomial order", min_value=0, max_value=5, initial=1
    )
    line_window_kms = FloatListField(
        label="Line window",
        length=2,
        min_value=-1000,
        max_value=1000,
        initial=[-20.0, 20.0],
        help_text="km/s, low, high: excluded from the baseline fit, integrated for the line",
    )
    velocity_resolution_kms = FloatField(
        label="Velocity resolution",
        min_value=0.01,
        max_value=50,
        initial=0.5,
        help_text="km/s channel width of the reduced spectra",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not data.get("reduce_lfa") and not data.get("reduce_hfa"):
            self.add_error("reduce_lfa", "reduce at least one module")
        window = data.get("line_window_kms")
        if window and len(window) == 2 and not window[0] < window[1]:
            self.add_error("line_window_kms", "the low end must be below the high end")
        return data
