"""CNCS parameters. Field names are the template keys; ``initial`` is the default."""

from __future__ import annotations

from typing import Any

from django import forms

from reduction.forms import (
    AbsolutePathField,
    FloatField,
    FloatListField,
    MaskField,
    NameListField,
    ReductionForm,
)

# Grouping files the instrument team keeps in /SNS/CNCS/shared/autoreduce/ (pixels summed per
# group: "8x2" = 8 tubes by 2 pixels).
GROUPING_DIR = "/SNS/CNCS/shared/autoreduce"
GROUPING_CHOICES = [
    (f"{GROUPING_DIR}/CNCS_{name}.xml", label)
    for name, label in (
        ("1x1", "1x1 (every pixel)"),
        ("2x1", "2x1"),
        ("4x1", "4x1"),
        ("8x1", "8x1"),
        ("8x2", "8x2"),
        ("powder", "powder rings"),
    )
]


class CNCSForm(ReductionForm):
    sections = [
        ("Normalisation", ["vanadium_file", "vanadium_integration_mev", "grouping_file"]),
        ("Energy transfer", ["incident_energy_mev", "e_min", "e_max", "e_step"]),
        ("Background and timing", ["do_tib", "tib_range_us", "t0_offset_us"]),
        ("Masking", ["mask"]),
        ("Logs", ["motor_names", "temperature_names"]),
        ("Outputs", ["create_elastic_nxspe", "create_md_nxs", "u_vector", "v_vector"]),
    ]

    vanadium_file = AbsolutePathField(
        label="Vanadium run",
        suffixes=(".nxs.h5", ".nxs", ".csv"),
        initial="/SNS/CNCS/IPTS-31234/nexus/CNCS_354920.nxs.h5",
        help_text="Detector vanadium used to normalise pixel efficiencies.",
    )
    vanadium_integration_mev = FloatListField(
        label="Vanadium integration range",
        length=2,
        min_value=-20,
        max_value=20,
        initial=[-0.5, 0.5],
        help_text="meV, low, high: the elastic window summed to get each pixel's efficiency.",
    )
    grouping_file = forms.ChoiceField(
        label="Grouping", choices=GROUPING_CHOICES, initial=f"{GROUPING_DIR}/CNCS_8x2.xml"
    )
    incident_energy_mev = FloatField(
        label="Incident energy",
        min_value=0.5,
        max_value=80,
        initial=3.32,
        help_text="meV; used when the run does not record Ei.",
    )
    e_min = FloatField(
        label="Emin", min_value=-1, max_value=1, initial=-0.2, help_text="fraction of Ei"
    )
    e_max = FloatField(
        label="Emax", min_value=-1, max_value=1, initial=0.95, help_text="fraction of Ei"
    )
    e_step = FloatField(
        label="Energy step",
        min_value=1e-4,
        max_value=0.5,
        initial=0.005,
        help_text="fraction of Ei",
    )
    do_tib = forms.BooleanField(
        label="Subtract time-independent background", required=False, initial=True
    )
    tib_range_us = FloatListField(
        label="TIB window",
        length=2,
        min_value=0,
        max_value=200000,
        initial=[44000.0, 47000.0],
        help_text="µs time of flight, low, high",
    )
    t0_offset_us = FloatField(
        label="T0 offset", min_value=-1000, max_value=1000, initial=0.0, help_text="µs"
    )
    mask = MaskField(
        banks=50,
        tubes=8,
        pixels=128,
        initial=[{"pixel": "1-8,121-128"}],
        help_text=(
            "One row per line: Bank=36-50 · Tube=1,8 · Pixel=1-8,121-128, parts separated by ; "
            "(banks 1-50, tubes 1-8, pixels 1-128)."
        ),
    )
    motor_names = NameListField(
        label="Motor logs",
        required=False,
        initial=["s1"],
        help_text="comma-separated log names recorded in the summary (e.g. s1, s2)",
    )
    temperature_names = NameListField(
        label="Temperature logs",
        required=False,
        initial=["SampleTemp"],
        help_text="comma-separated log names; the first one present is the sample temperature",
    )
    create_elastic_nxspe = forms.BooleanField(
        label="Also write an elastic NXSPE", required=False, initial=False
    )
    create_md_nxs = forms.BooleanField(
        label="Also write an MD event file", required=False, initial=False
    )
    u_vector = FloatListField(
        label="u vector", length=3, initial=[1.0, 0.0, 0.0], help_text="h, k, l along the beam"
    )
    v_vector = FloatListField(
        label="v vector", length=3, initial=[0.0, 1.0, 0.0], help_text="h, k, l in the plane"
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        self.require_less("e_min", "e_max", "Emax must be larger than Emin")
        energies: list[Any] = [data.get(name) for name in ("e_min", "e_max", "e_step")]
        if None not in energies:
            e_min, e_max, e_step = energies
            if e_min < e_max and e_step >= e_max - e_min:
                self.add_error("e_step", "the step must be smaller than Emax - Emin")
        for name in ("vanadium_integration_mev", "tib_range_us"):
            pair = data.get(name)
            if pair and len(pair) == 2 and not pair[0] < pair[1]:
                self.add_error(name, "the low end must be below the high end")
        u, v = data.get("u_vector"), data.get("v_vector")
        if u and v and len(u) == 3 and len(v) == 3:
            cross = (
                u[1] * v[2] - u[2] * v[1],
                u[2] * v[0] - u[0] * v[2],
                u[0] * v[1] - u[1] * v[0],
            )
            if all(abs(c) < 1e-9 for c in cross):
                self.add_error("v_vector", "u and v must not be parallel")
        return data
