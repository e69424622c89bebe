"""Field grammars and the instrument forms: what they accept, what they reject, and that a
stored value re-validates to itself."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from reduction.forms import (
    FloatListField,
    IntegerRangeListField,
    MaskField,
    format_mask,
    parse_int_ranges,
    parse_mask,
)
from reduction.instruments import INSTRUMENTS, UnknownInstrument, get_instrument

LIMITS = {"bank": 50, "tube": 8, "pixel": 128}


def test_integer_ranges_accept_lists_and_ranges_and_reject_the_rest() -> None:
    field = IntegerRangeListField(min_item=0, max_item=63)
    assert field.clean(" 1, 3 - 5 ") == "1,3-5"
    for bad in ("a", "5-3", "64", "1,,2", "-1"):
        with pytest.raises(ValidationError):
            field.clean(bad)


def test_float_lists_accept_scientific_notation_with_negative_exponents() -> None:
    assert FloatListField().clean("-0.5,1e-3") == [-0.5, 0.001]
    with pytest.raises(ValidationError, match="expected 3 numbers"):
        FloatListField(length=3).clean("1, 2")
    with pytest.raises(ValidationError, match="not a number"):
        FloatListField().clean("1, x")
    with pytest.raises(ValidationError, match="finite"):
        FloatListField().clean("inf")


def test_mask_rows_round_trip_in_a_fixed_format_without_eval() -> None:
    rows = parse_mask("Bank=70\nPixel=1-7", {"bank": 100, "tube": 8, "pixel": 128})
    assert rows == [{"bank": "70"}, {"pixel": "1-7"}]
    text = format_mask([{"bank": 70, "pixel": "1-12"}, {"pixel": "1-7"}])
    assert text == "Bank=70; Pixel=1-12\nPixel=1-7"
    assert parse_mask(text, {"bank": 100, "tube": 8, "pixel": 128}) == [
        {"bank": "70", "pixel": "1-12"},
        {"pixel": "1-7"},
    ]


def test_mask_parts_may_be_separated_by_spaces_and_use_any_case() -> None:
    assert parse_mask("pixel=1-8, 121-128  bank = 36-50  # edges\n\n", LIMITS) == [
        {"bank": "36-50", "pixel": "1-8,121-128"}
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Bank=51", "above the largest allowed value 50"),
        ("Tube=0", "below the smallest"),
        ("Pixel=8-1", "goes downwards"),
        ("Bank=1; Bank=2", "given twice"),
        ("Detector=3", "is not Bank"),
        ("__import__('os').system('true')", "is not Bank"),
        ("Bank=1+1", "not a number or a range"),
    ],
)
def test_mask_syntax_errors_name_the_line_and_part(text: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        MaskField(banks=50, tubes=8, pixels=128).clean(text)
    assert message in info.value.messages[0]
    assert "line 1" in info.value.messages[0]


@pytest.mark.parametrize("key", list(INSTRUMENTS))
def test_every_instrument_defaults_validate_and_round_trip(key: str) -> None:
    instrument = get_instrument(key)
    defaults = instrument.defaults()
    assert list(defaults) == instrument.form_class.parameter_names()
    form = instrument.form_class.from_values(defaults)
    assert form.is_valid(), form.errors
    assert form.cleaned_values() == defaults


def test_unknown_instrument_is_a_clear_error() -> None:
    with pytest.raises(UnknownInstrument, match="unknown reduction instrument 'nope'; known: "):
        get_instrument("nope")


def test_from_values_reports_missing_unknown_and_wrongly_typed_keys_by_name() -> None:
    instrument = get_instrument("cncs")
    values = instrument.defaults()
    del values["e_step"]
    values["e_min"] = [1, 2]
    values["do_tib"] = "yes"
    values["mask"] = [{"bank": "1", "detector": "2"}]
    values["colour"] = "blue"
    form = instrument.form_class.from_values(values)
    assert not form.is_valid()
    assert form.errors["e_step"] == ["missing: every parameter of the instrument must be given"]
    assert form.errors["e_min"] == ["expected a number, got a list"]
    assert form.errors["do_tib"] == ["expected true/false, got text"]
    assert "mask rows must be objects" in form.errors["mask"][0]
    assert "colour: unknown parameter" in form.non_field_errors()


def test_cross_field_rules_of_cncs() -> None:
    instrument = get_instrument("cncs")
    values = instrument.defaults() | {
        "e_min": 0.5,
        "e_max": 0.2,
        "tib_range_us": [5.0, 1.0],
        "u_vector": [1.0, 1.0, 0.0],
        "v_vector": [2.0, 2.0, 0.0],
    }
    form = instrument.form_class.from_values(values)
    assert not form.is_valid()
    assert form.errors["e_max"] == ["Emax must be larger than Emin"]
    assert form.errors["tib_range_us"] == ["the low end must be below the high end"]
    assert form.errors["v_vector"] == ["u and v must not be parallel"]

    step = instrument.form_class.from_values(instrument.defaults() | {"e_step": 0.5, "e_max": 0.2})
    assert not step.is_valid()
    assert step.errors["e_step"] == ["the step must be smaller than Emax - Emin"]


def test_ranges_are_enforced_and_numbers_may_arrive_as_text() -> None:
    instrument = get_instrument("chai")
    form = instrument.form_class.from_values(
        instrument.defaults() | {"lfa_line_ghz": 500.0, "baseline_order": "2"}
    )
    assert not form.is_valid()
    assert "less than or equal to 495" in form.errors["lfa_line_ghz"][0]
    assert "baseline_order" not in form.errors

    none = instrument.form_class.from_values(
        instrument.defaults() | {"reduce_lfa": False, "reduce_hfa": False}
    )
    assert not none.is_valid()
    assert none.errors["reduce_lfa"] == ["reduce at least one module"]


def test_primecam_modules_accept_only_known_modules() -> None:
    instrument = get_instrument("primecam")
    form = instrument.form_class.from_values(instrument.defaults() | {"modules": ["450"]})
    assert not form.is_valid()
    assert "450 is not one of the available choices" in form.errors["modules"][0]


def test_huge_numbers_in_ranges_are_a_form_error_not_a_crash() -> None:
    # int() of more than 4300 digits raises ValueError in Python; the field must answer first.
    field = IntegerRangeListField()
    with pytest.raises(ValidationError, match="too large"):
        parse_int_ranges("9" * 5000)
    with pytest.raises(ValidationError, match="too large"):
        field.clean("9" * 30)
    with pytest.raises(ValidationError, match="too large"):
        field.clean("1-" + "9" * 10)
    with pytest.raises(ValidationError, match="too large"):
        MaskField(banks=50, tubes=8, pixels=128).clean("Bank=" + "9" * 5000)
    assert field.clean("999999999") == "999999999"


@pytest.mark.parametrize(
    ("key", "name", "text"),
    [
        ("chai", "flag_pixels", ",".join(["1-63"] * 1000)),
        ("chai", "line_window_kms", ", ".join(["1.0"] * 1000)),
        ("cncs", "motor_names", ", ".join(["s1"] * 1000)),
        ("cncs", "mask", "\n".join(["Bank=1-50; Tube=1-8; Pixel=1-128"] * 1000)),
        ("cncs", "vanadium_file", "/SNS/" + "a" * 1000 + ".nxs.h5"),
    ],
)
def test_huge_values_are_refused_with_their_length(key: str, name: str, text: str) -> None:
    instrument = get_instrument(key)
    form = instrument.form_class.from_values(instrument.defaults() | {name: text})
    assert not form.is_valid()
    assert f"(it has {len(text)})" in form.errors[name][0]


def test_text_no_database_can_store_is_refused_by_name() -> None:
    instrument = get_instrument("cncs")
    for bad in ("/SNS/CNCS/van\ud800.nxs.h5", "/SNS/CNCS/van\x00.nxs.h5"):
        form = instrument.form_class.from_values(instrument.defaults() | {"vanadium_file": bad})
        assert not form.is_valid()
        assert form.errors["vanadium_file"] == ["contains a NUL character or invalid Unicode"]
    rows = instrument.form_class.from_values(
        instrument.defaults() | {"mask": [{"bank": "1\udfff"}]}
    )
    assert rows.errors["mask"] == ["contains a NUL character or invalid Unicode"]


@pytest.mark.parametrize(
    "path",
    ["/SNS/CNCS/../../etc/passwd", "/SNS/CNCS/..", "SNS/CNCS/van.nxs", "/SNS/CNCS/v\x1b.nxs"],
)
def test_paths_that_climb_are_relative_or_hold_control_characters_are_refused(path: str) -> None:
    instrument = get_instrument("cncs")
    form = instrument.form_class.from_values(instrument.defaults() | {"vanadium_file": path})
    assert not form.is_valid()
    assert "vanadium_file" in form.errors


def test_grouping_accepts_only_the_listed_files() -> None:
    instrument = get_instrument("cncs")
    form = instrument.form_class.from_values(
        instrument.defaults() | {"grouping_file": "/SNS/CNCS/shared/autoreduce/../../x.xml"}
    )
    assert not form.is_valid()
    assert "is not one of the available choices" in form.errors["grouping_file"][0]


def test_a_non_finite_item_is_named_without_its_padding() -> None:
    with pytest.raises(ValidationError) as info:
        FloatListField().clean("1, inf")
    assert info.value.messages == ["'inf' is not a finite number"]
