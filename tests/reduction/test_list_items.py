"""List parameters given as JSON (an import file, ``set KEY=[...]``, a stored value): every item
must be of the list's type. Anything else is a field error naming the key and the item, through
the command, the service and the form alike, and changes nothing."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from reduction.errors import InvalidParameters
from reduction.instruments import get_instrument
from reduction.models import ParameterSet, PropertyModification, ReductionProperty
from reduction.services import reduction_config_current, reduction_config_update

pytestmark = pytest.mark.django_db

# (bad list, what the error says about it)
BAD_FLOAT_LISTS = [
    (["a", 0], "item 1 is text"),
    ([None, 0], "item 1 is null"),
    ([0, [1]], "item 2 is a list"),
    ([0, {"x": 1}], "item 2 is an object"),
    ([True, 0], "item 1 is true/false"),
    ([0, False], "item 2 is true/false"),
    ([0, 10**400], "item 2 is too large"),
]


def snapshot(key: str) -> tuple[object, ...]:
    path = get_instrument(key).script_path()
    return (
        list(ReductionProperty.objects.values_list("instrument", "key", "value")),
        PropertyModification.objects.count(),
        list(ParameterSet.objects.values_list("instrument", "number")),
        path.read_bytes() if path.exists() else None,
    )


@pytest.fixture
def saved_chai() -> None:
    reduction_config_update("chai", values=reduction_config_current("chai"), user=None)


@pytest.mark.parametrize(("items", "message"), BAD_FLOAT_LISTS)
def test_import_refuses_a_float_list_with_a_non_number_item_and_changes_nothing(
    saved_chai: None, tmp_path: Path, items: list[Any], message: str
) -> None:
    before = snapshot("chai")
    document = tmp_path / "chai.json"
    values = reduction_config_current("chai") | {"line_window_kms": items}
    document.write_text(json.dumps({"instrument": "chai", "values": values}))

    with pytest.raises(CommandError) as info:
        call_command("reduction_config", "import", "chai", str(document), stdout=StringIO())

    assert f"line_window_kms: expected a list of numbers, {message}" in str(info.value)
    assert snapshot("chai") == before


@pytest.mark.parametrize(("items", "message"), BAD_FLOAT_LISTS)
def test_set_refuses_a_float_list_with_a_non_number_item_and_changes_nothing(
    saved_chai: None, items: list[Any], message: str
) -> None:
    before = snapshot("chai")
    with pytest.raises(CommandError, match=f"expected a list of numbers, {message}"):
        call_command(
            "reduction_config",
            "set",
            "chai",
            f"line_window_kms={json.dumps(items)}",
            stdout=StringIO(),
        )
    assert snapshot("chai") == before


@pytest.mark.parametrize(("items", "message"), BAD_FLOAT_LISTS)
def test_the_service_refuses_a_cncs_vector_with_a_non_number_item_and_changes_nothing(
    items: list[Any], message: str
) -> None:
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = snapshot("cncs")
    values = reduction_config_current("cncs") | {"u_vector": [*items, 0]}

    with pytest.raises(InvalidParameters) as info:
        reduction_config_update("cncs", values=values, user=None)

    assert info.value.errors["u_vector"] == [f"expected a list of numbers, {message}"]
    assert snapshot("cncs") == before


def test_the_form_reports_a_bad_item_as_an_error_of_its_field() -> None:
    form_class = get_instrument("cncs").form_class
    values = form_class.initial_values() | {"tib_range_us": [44000.0, "47000"]}

    form = form_class.from_values(values)

    assert not form.is_valid()
    assert form.errors["tib_range_us"] == ["expected a list of numbers, item 2 is text"]
    assert set(form.errors) == {"tib_range_us"}


def test_integers_in_a_float_list_are_numbers() -> None:
    form_class = get_instrument("cncs").form_class
    form = form_class.from_values(form_class.initial_values() | {"u_vector": [1, 0, 0]})
    assert form.is_valid(), form.errors
    assert form.cleaned_values()["u_vector"] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["s1", None], "item 2 is null"),
        (["s1", 7], "item 2 is int"),
        ([True], "item 1 is true/false"),
        ([["s1"]], "item 1 is a list"),
    ],
)
def test_the_service_refuses_a_name_list_with_a_non_text_item_and_changes_nothing(
    items: list[Any], message: str
) -> None:
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = snapshot("cncs")
    values = reduction_config_current("cncs") | {"motor_names": items}

    with pytest.raises(InvalidParameters) as info:
        reduction_config_update("cncs", values=values, user=None)

    assert info.value.errors["motor_names"] == [f"expected a list of names, {message}"]
    assert snapshot("cncs") == before
