"""reduction.signals.parameter_set_created: sent once per new version, inside the save's
transaction, and a save works the same with no receiver at all."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

from pipelines.receivers import parameter_set_created_mark_stale
from reduction.instruments import get_instrument
from reduction.models import ParameterSet, PropertyModification, ReductionProperty
from reduction.services import reduction_config_current, reduction_config_update
from reduction.signals import parameter_set_created
from tests.factories import DataProductFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    """Every send of the signal, with what the receiver saw of the save at that moment."""
    calls: list[dict[str, Any]] = []
    script_path = get_instrument("cncs").script_path()

    def record(sender: Any, **kwargs: Any) -> None:
        kwargs.pop("signal")
        calls.append(
            kwargs
            | {
                "sender": sender,
                "atomic_depth": len(transaction.get_connection().atomic_blocks),
                "script_on_disk": script_path.read_text() if script_path.exists() else None,
            }
        )

    parameter_set_created.connect(record, weak=False)
    try:
        yield calls
    finally:
        parameter_set_created.disconnect(record)


@pytest.fixture
def without_pipelines() -> Iterator[None]:
    """The save with pipelines not listening."""
    assert parameter_set_created.disconnect(parameter_set_created_mark_stale)
    try:
        yield
    finally:
        parameter_set_created.connect(parameter_set_created_mark_stale)


def test_it_is_sent_once_per_new_version_with_the_new_and_the_previous_one(
    sent: list[dict[str, Any]],
) -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)  # no-op
    v2 = reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_max": 0.9}, user=None
    )

    assert [(c["instrument_key"], c["parameter_set"], c["previous"]) for c in sent] == [
        ("cncs", v1.parameter_set, None),
        ("cncs", v2.parameter_set, v1.parameter_set),
    ]
    assert {c["sender"] for c in sent} == {ParameterSet}


def test_it_is_sent_inside_the_save_before_the_script_is_placed(
    sent: list[dict[str, Any]],
) -> None:
    depth = len(transaction.get_connection().atomic_blocks)  # the test case's own, if any
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    v2 = reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_max": 0.9}, user=None
    )
    assert [c["atomic_depth"] for c in sent] == [depth + 1, depth + 1]
    assert [c["script_on_disk"] for c in sent] == [None, v1.parameter_set.script_text]
    assert get_instrument("cncs").script_path().read_text() == v2.parameter_set.script_text


def test_a_receiver_that_raises_aborts_the_save() -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = (
        list(ReductionProperty.objects.values_list("key", "value")),
        PropertyModification.objects.count(),
        get_instrument("cncs").script_path().read_bytes(),
    )

    class Refused(Exception):
        pass

    def refuse(sender: Any, **kwargs: Any) -> None:
        raise Refused

    parameter_set_created.connect(refuse, weak=False)
    try:
        with pytest.raises(Refused):
            reduction_config_update(
                "cncs", values=reduction_config_current("cncs") | {"e_max": 0.9}, user=None
            )
    finally:
        parameter_set_created.disconnect(refuse)

    assert list(ParameterSet.objects.all()) == [v1.parameter_set]
    assert (
        list(ReductionProperty.objects.values_list("key", "value")),
        PropertyModification.objects.count(),
        get_instrument("cncs").script_path().read_bytes(),
    ) == before


@pytest.mark.usefixtures("without_pipelines")
def test_a_save_works_with_no_receiver() -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    product = DataProductFactory(produced_by__parameter_set=v1.parameter_set)

    v2 = reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_max": 0.9}, user=None
    )

    assert v2.created and v2.parameter_set.number == 2
    assert get_instrument("cncs").script_path().read_text() == v2.parameter_set.script_text
    product.refresh_from_db()
    assert product.stale_since is None  # nobody marked it: pipelines was not listening
