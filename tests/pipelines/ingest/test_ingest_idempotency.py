"""A retried registration is compared with what the database gives back, not with what was sent.

PostgreSQL's jsonb keeps numbers as exact decimals and prints them without an exponent, so a
float such as 6.02214076e23 comes back as the integer 602214076000000000000000; SQLite keeps the
JSON text and gives the float back. Either way an identical retry is the same file.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from pipelines.exceptions import IngestError
from pipelines.models import DataLocation, ExecutedObsUnit, RawDataFile
from pipelines.services.ingest import raw_data_file_register, raw_data_files_register_bulk
from tests.pipelines.ingest.test_ingest import _counts, _file_kwargs

pytestmark = pytest.mark.django_db

AVOGADRO = 6.02214076e23
NUMBERS: dict[str, Any] = {
    "avogadro": AVOGADRO,
    "nested": [1e300, {"planck": 6.62607015e-34, "big": 2.5e20}],
    "negative": -1.5e22,
    "small": 1e-7,
    "third": 1 / 3,
    "zero": -0.0,
    "integer": 2**62,
}


def test_it_answers_an_identical_retry_with_large_floats_in_metadata_as_a_repeat(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source, metadata=NUMBERS)
    first, _ = raw_data_file_register(**kwargs, actor="api")
    before = _counts()

    again, created = raw_data_file_register(**kwargs, actor="api")

    assert created is False
    assert again.pk == first.pk
    assert _counts() == before


def test_on_postgres_large_floats_come_back_as_integers_yet_the_retry_is_a_repeat(
    require_postgres: None, scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source, metadata={"x": AVOGADRO})
    raw_data_file_register(**kwargs, actor="api")
    stored = RawDataFile.objects.get(pk=kwargs["id"]).metadata
    # What makes a naive comparison fail: the stored form is an exact integer.
    assert stored == {"x": 602214076000000000000000}
    assert isinstance(stored["x"], int)
    before = _counts()

    again, created = raw_data_file_register(**kwargs, actor="api")

    assert created is False
    assert again.pk == kwargs["id"]
    assert _counts() == before


def test_it_answers_a_bulk_retry_with_large_floats_as_repeats(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    items = [
        _file_kwargs(scan, module, source, f"bulk/{n}.fits", bytes([n]) * 16, metadata=NUMBERS)
        for n in range(3)
    ]
    raw_data_files_register_bulk(items, actor="api")
    before = _counts()

    results = raw_data_files_register_bulk(items, actor="api")

    assert [created for _, created in results] == [False, False, False]
    assert _counts() == before


def test_it_treats_an_integer_and_a_float_of_the_same_value_as_the_same_number(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source, metadata={"subscan": 3, "scale": 2.0})
    raw_data_file_register(**kwargs, actor="api")

    _, created = raw_data_file_register(
        **{**kwargs, "metadata": {"subscan": 3.0, "scale": 2}}, actor="api"
    )

    assert created is False


@pytest.mark.parametrize(
    ("stored", "retried"),
    [
        ({"x": AVOGADRO}, {"x": 6.02214077e23}),
        ({"x": AVOGADRO}, {"x": 602214076000000000000001}),
        ({"x": 1e-7}, {"x": math.nextafter(1e-7, 1)}),
        ({"flag": True}, {"flag": 1}),
        ({"flag": 0}, {"flag": False}),
        ({"x": 1.5}, {"x": "1.5"}),
        ({"x": None}, {"x": 0}),
        ({"x": [1, 2]}, {"x": [1, 2, 3]}),
        ({"x": [1, 2]}, {"x": {"0": 1, "1": 2}}),
        ({"x": {"a": 1}}, {"x": {"a": 1, "b": 2}}),
        ({"x": {"a": 1}}, {"x": {"b": 1}}),
    ],
    ids=[
        "another-float",
        "another-integer",
        "a-tiny-difference",
        "bool-is-not-1",
        "0-is-not-false",
        "number-is-not-text",
        "null-is-not-0",
        "longer-list",
        "list-is-not-object",
        "extra-key",
        "other-key",
    ],
)
def test_it_still_refuses_a_retry_whose_metadata_differs(
    scan: ExecutedObsUnit,
    module: Any,
    source: DataLocation,
    stored: dict[str, Any],
    retried: dict[str, Any],
) -> None:
    kwargs = _file_kwargs(scan, module, source, metadata=stored)
    raw_data_file_register(**kwargs, actor="api")
    row_before = RawDataFile.objects.values().get(pk=kwargs["id"])
    before = _counts()

    with pytest.raises(IngestError, match="already registered with different data: metadata"):
        raw_data_file_register(**{**kwargs, "metadata": retried}, actor="api")

    assert _counts() == before
    assert RawDataFile.objects.values().get(pk=kwargs["id"]) == row_before
