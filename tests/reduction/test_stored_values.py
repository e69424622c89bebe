"""Values compared in the form the database keeps them: PostgreSQL's jsonb stores numbers as
exact decimals (1e30 comes back as the integer 10**30), so a save of equal values must not look
like a change on one database and not on the other."""

from __future__ import annotations

from typing import Any

import pytest

from reduction.models import ParameterSet, PropertyModification
from reduction.services import (
    reduction_config_current,
    reduction_config_preview,
    reduction_config_update,
    stored_values_equal,
)
from tests.factories import DataProductFactory

pytestmark = pytest.mark.django_db

LARGE = {"u_vector": [1e30, 0.0, 0.0], "t0_offset_us": 0.0, "e_step": 1e-4}


def save_twice_and_check_the_second_is_no_change() -> None:
    values = reduction_config_current("cncs") | LARGE
    first = reduction_config_update("cncs", values=values, user=None)
    product = DataProductFactory(produced_by__parameter_set=first.parameter_set)
    audit = PropertyModification.objects.count()

    again = reduction_config_update("cncs", values=values, user=None)

    assert (again.created, again.changed_keys) == (False, [])
    assert list(ParameterSet.objects.values_list("number", flat=True)) == [1]
    assert PropertyModification.objects.count() == audit
    product.refresh_from_db()
    assert product.stale_since is None
    assert again.path.read_text() == first.parameter_set.script_text
    preview = reduction_config_preview("cncs", values)
    assert (preview.version, preview.checksum) == (1, first.checksum)


def test_saving_large_floats_twice_makes_no_new_version_on_postgresql(
    require_postgres: None,
) -> None:
    save_twice_and_check_the_second_is_no_change()


def test_saving_large_floats_twice_makes_no_new_version_on_any_database() -> None:
    save_twice_and_check_the_second_is_no_change()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1e30, 10**30),
        ([1e30, 0.0, 0.0], [10**30, 0, 0]),
        ({"x": [1e23]}, {"x": [10**23]}),
        (0.1, 0.1),
        ("1", "1"),
        (None, None),
    ],
)
def test_numbers_equal_as_exact_decimals_compare_equal(a: Any, b: Any) -> None:
    assert stored_values_equal(a, b) and stored_values_equal(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1e23, 10**23 + 1),
        (True, 1),
        (False, 0),
        ([True], [1.0]),
        (1, "1"),
        (None, 0),
        ([1, 2], [1, 2, 3]),
        ({"x": 1}, {"y": 1}),
        ({"x": 1}, [("x", 1)]),
        ([{"bank": "1"}], [{"bank": 1}]),
    ],
)
def test_different_values_and_booleans_against_numbers_compare_unequal(a: Any, b: Any) -> None:
    assert not stored_values_equal(a, b) and not stored_values_equal(b, a)
