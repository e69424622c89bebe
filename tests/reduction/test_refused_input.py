"""Text the forms refuse before any parsing: invisible and control characters, numbers Python
would read but an operator did not mean (``1_0``), numbers too large for a float (``1e999``).
Every refusal is a field error naming what is wrong, from the page, the preview and the command
alike, and leaves the database and the installed script as they were."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from reduction.forms import FloatListField, IntegerField, describe_character, parse_number
from reduction.instruments import get_instrument
from reduction.models import ParameterSet, PropertyModification, ReductionProperty
from reduction.services import reduction_config_current, reduction_config_update

pytestmark = pytest.mark.django_db


def snapshot(key: str) -> tuple[object, ...]:
    path = get_instrument(key).script_path()
    return (
        list(ReductionProperty.objects.values_list("instrument", "key", "value")),
        PropertyModification.objects.count(),
        list(ParameterSet.objects.values_list("instrument", "number")),
        path.read_bytes() if path.exists() else None,
    )


def post_data(key: str, **changes: Any) -> dict[str, Any]:
    form = get_instrument(key).form_class.from_values(reduction_config_current(key))
    return dict(form.data) | changes


@pytest.fixture
def saved() -> None:
    """Version 1 of CNCS and CHAI installed, so that a refusal has something to leave alone."""
    for key in ("cncs", "chai"):
        reduction_config_update(key, values=reduction_config_current(key), user=None)


# --- Characters ----------------------------------------------------------------------------------

INVISIBLE = [
    ("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("\u200b", "U+200B ZERO WIDTH SPACE"),
    ("\u2028", "U+2028 LINE SEPARATOR"),
    ("\u2029", "U+2029 PARAGRAPH SEPARATOR"),
    ("\x85", "U+0085 NEXT LINE"),
    ("\t", "U+0009 CHARACTER TABULATION"),
    ("\x1b", "U+001B ESCAPE"),
]


SINGLE_LINE = [
    ("vanadium_file", "/SNS/CNCS/IPTS-1/nexus/CNCS_1{}.nxs.h5"),
    ("vanadium_file", "/SNS/CNCS/IPTS-1/nexus/CNCS_1.nxs.h5{}"),  # stripped as a blank
    ("e_min", "-0.1{}"),
    ("e_min", "{}-0.1"),
    ("tib_range_us", "44000,{}47000"),
    ("motor_names", "s1{}"),
    ("grouping_file", "/SNS/CNCS/shared/autoreduce/CNCS_8x2.xml{}"),
]


# Every character in the path, every kind of field with the characters in turn.
@pytest.mark.parametrize(
    ("field", "template", "char", "name"),
    [(*SINGLE_LINE[0], char, name) for char, name in INVISIBLE]
    + [(*field, *INVISIBLE[i % len(INVISIBLE)]) for i, field in enumerate(SINGLE_LINE[1:])],
)
def test_single_line_fields_refuse_invisible_and_control_characters_by_name(
    client: Any, cncs_scientist: Any, saved: None, field: str, template: str, char: str, name: str
) -> None:
    before = snapshot("cncs")
    client.force_login(cncs_scientist)
    value = template.format(char)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]), post_data("cncs", **{field: value})
    )
    assert response.status_code == 200
    assert response.context["form"].errors[field] == [
        f"must not contain {name} (an invisible or control character)"
    ]
    # Only the field with the character is marked: no cross-field rule ran on a stripped value.
    assert list(response.context["form"].errors) == [field]
    assert snapshot("cncs") == before


def test_the_mask_allows_line_breaks_and_nothing_else_of_those_categories(
    client: Any, cncs_scientist: Any, saved: None
) -> None:
    client.force_login(cncs_scientist)
    url = reverse("reduction:configure", args=["cncs"])
    before = snapshot("cncs")
    for char, name in [*INVISIBLE, ("\r", "U+000D CARRIAGE RETURN")]:
        response = client.post(url, post_data("cncs", mask=f"Bank=36-50\nPixel=1-8{char}"))
        assert response.context["form"].errors["mask"] == [
            f"must not contain {name} (an invisible or control character)"
        ], name
    assert snapshot("cncs") == before
    # A browser sends a textarea's lines as CRLF.
    response = client.post(url, post_data("cncs", mask="Bank=36-50\r\nPixel=1-8"))
    assert response.status_code == 302
    assert ParameterSet.objects.latest_for("cncs").values["mask"] == [  # type: ignore[union-attr]
        {"bank": "36-50"},
        {"pixel": "1-8"},
    ]


def test_the_preview_names_the_character_too(client: Any, cncs_scientist: Any) -> None:
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:preview", args=["cncs"]),
        post_data("cncs", vanadium_file="/SNS/CNCS/a\u202eb.nxs"),
    )
    assert response.status_code == 400
    assert response.json()["errors"]["vanadium_file"] == [
        "must not contain U+202E RIGHT-TO-LEFT OVERRIDE (an invisible or control character)"
    ]


def test_a_comment_with_an_invisible_character_is_refused(
    client: Any, cncs_scientist: Any, saved: None
) -> None:
    before = snapshot("cncs")
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]),
        post_data("cncs", e_min="-0.15", comment="beam\u200bstop"),
    )
    assert response.context["comment_errors"] == [
        "must not contain U+200B ZERO WIDTH SPACE (an invisible or control character)"
    ]
    assert snapshot("cncs") == before


def test_import_and_set_refuse_invisible_characters(tmp_path: Path, saved: None) -> None:
    before = snapshot("cncs")
    document = tmp_path / "cncs.json"
    values = reduction_config_current("cncs")
    for change in (
        {"vanadium_file": "/SNS/CNCS/x\u2028.nxs"},
        {"motor_names": ["s1\u202e"]},
        {"mask": [{"bank": "1"}, {"pixel": "1-8\u0085"}]},
    ):
        document.write_text(json.dumps({"values": values | change}))
        with pytest.raises(CommandError, match="must not contain U\\+"):
            call_command("reduction_config", "import", "cncs", str(document), stdout=StringIO())
    with pytest.raises(CommandError, match="must not contain U\\+202E RIGHT-TO-LEFT OVERRIDE"):
        call_command(
            "reduction_config", "set", "cncs", "vanadium_file=/a\u202e.nxs", stdout=StringIO()
        )
    assert snapshot("cncs") == before


def test_characters_without_a_unicode_name_are_still_named() -> None:
    assert describe_character("\x85") == "U+0085 NEXT LINE"
    assert describe_character("\x01") == "U+0001 control character"


# --- Numbers with underscores and other non-ASCII spellings --------------------------------------


@pytest.mark.parametrize("text", ["1_0", "-0_5", "1_000.5", "1e1_0", "\u0661", "\uff11", "0x10"])
def test_numbers_python_would_read_are_not_numbers_here(text: str) -> None:
    with pytest.raises(Exception, match="is not a number"):
        parse_number(text)
    with pytest.raises(Exception, match="is not a number"):
        FloatListField().clean(f"1, {text}")
    with pytest.raises(Exception, match="is not a whole number"):
        IntegerField().clean(text)


@pytest.mark.parametrize(
    ("key", "field", "value"),
    [
        ("cncs", "e_min", "-0_5"),
        ("cncs", "e_step", "0.00_5"),
        ("cncs", "tib_range_us", "44_000, 47000"),
        ("cncs", "u_vector", "1_0, 0, 0"),
        ("chai", "baseline_order", "1_0"),
        ("chai", "flag_pixels", "1_0"),
        ("chai", "line_window_kms", "-2_0, 20"),
    ],
)
def test_underscored_numbers_are_refused_by_the_page_and_the_command(
    client: Any, operator: Any, saved: None, tmp_path: Path, key: str, field: str, value: str
) -> None:
    before = snapshot(key)
    client.force_login(operator)
    response = client.post(
        reverse("reduction:configure", args=[key]), post_data(key, **{field: value})
    )
    assert response.status_code == 200
    assert "not a" in response.context["form"].errors[field][0]
    with pytest.raises(CommandError, match=f"{field}: .*not a"):
        call_command("reduction_config", "set", key, f"{field}={value}", stdout=StringIO())
    document = tmp_path / "values.json"
    document.write_text(json.dumps({"values": reduction_config_current(key) | {field: value}}))
    with pytest.raises(CommandError, match=f"{field}: .*not a"):
        call_command("reduction_config", "import", key, str(document), stdout=StringIO())
    assert snapshot(key) == before


# --- Numbers too large for a float ---------------------------------------------------------------


def test_a_number_too_large_is_kept_as_typed_and_said_to_be_out_of_range(
    client: Any, cncs_scientist: Any, saved: None
) -> None:
    before = snapshot("cncs")
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]),
        post_data("cncs", incident_energy_mev="1e999"),
    )
    assert response.context["form"].errors["incident_energy_mev"] == [
        "1e999 is out of range (at least 0.5 and at most 80)"
    ]
    page = response.content.decode()
    # A text input (a number input would be blanked by the browser), showing what was typed.
    assert '<input type="text" name="incident_energy_mev" value="1e999" inputmode="decimal"' in page
    assert 'type="number"' not in page
    assert snapshot("cncs") == before
    with pytest.raises(CommandError, match="incident_energy_mev: 1e999 is out of range"):
        call_command(
            "reduction_config", "set", "cncs", "incident_energy_mev=1e999", stdout=StringIO()
        )
    assert snapshot("cncs") == before
