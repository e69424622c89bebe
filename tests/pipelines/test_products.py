"""Stale products: a new reduction parameter set marks the products of older ones, in the save's
transaction (through reduction.signals.parameter_set_created and pipelines.receivers)."""

from __future__ import annotations

import pytest
from django.db import transaction

from pipelines.models import DataProduct
from pipelines.services.products import products_mark_stale_for_parameter_set
from reduction import services
from reduction.errors import ScriptWriteError
from reduction.models import ParameterSet
from reduction.services import reduction_config_current, reduction_config_update
from tests.factories import DataProductFactory

pytestmark = pytest.mark.django_db


def _save_e_max(e_max: float) -> ParameterSet:
    return reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_max": e_max}, user=None
    ).parameter_set


def test_saving_new_parameters_marks_older_products_stale() -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    old = DataProductFactory(produced_by__parameter_set=v1.parameter_set)
    unrelated = DataProductFactory()

    v2 = _save_e_max(0.9)
    current = DataProductFactory(produced_by__parameter_set=v2)

    old.refresh_from_db()
    unrelated.refresh_from_db()
    assert old.stale_since is not None
    assert old.stale_reason == "made with older cncs reduction parameters; v2 is current"
    assert unrelated.stale_since is None
    assert products_mark_stale_for_parameter_set(v2) == 0  # already marked, current is fresh
    current.refresh_from_db()
    assert current.stale_since is None


def test_products_already_stale_keep_their_first_date_and_reason() -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    old = DataProductFactory(produced_by__parameter_set=v1.parameter_set)
    _save_e_max(0.9)
    old.refresh_from_db()
    first = (old.stale_since, old.stale_reason)

    _save_e_max(0.8)

    old.refresh_from_db()
    assert (old.stale_since, old.stale_reason) == first


def test_other_instruments_products_are_not_marked() -> None:
    chai = reduction_config_update("chai", values=reduction_config_current("chai"), user=None)
    product = DataProductFactory(produced_by__parameter_set=chai.parameter_set)
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    _save_e_max(0.9)

    product.refresh_from_db()
    assert product.stale_since is None


def test_a_save_that_fails_after_the_marks_leaves_the_products_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    old = DataProductFactory(produced_by__parameter_set=v1.parameter_set)

    def no_space(*args: object, **kwargs: object) -> None:
        raise ScriptWriteError("cannot write reduce_CNCS.py: No space left on device")

    # The script is placed after the signal was sent: the marks must roll back with the save.
    monkeypatch.setattr(services, "_place_script", no_space)
    with pytest.raises(ScriptWriteError):
        _save_e_max(0.9)

    old.refresh_from_db()
    assert old.stale_since is None
    assert ParameterSet.objects.filter(instrument="cncs").count() == 1


def test_a_save_in_a_callers_transaction_that_rolls_back_leaves_the_products_fresh() -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    old = DataProductFactory(produced_by__parameter_set=v1.parameter_set)

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        _save_e_max(0.9)
        assert DataProduct.objects.get(pk=old.pk).stale_since is not None
        raise Abort

    old.refresh_from_db()
    assert old.stale_since is None
