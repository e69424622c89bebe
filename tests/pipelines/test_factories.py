"""Every factory builds a row the database accepts (and so every constraint admits it)."""

import inspect

import pytest
from factory.django import DjangoModelFactory

from tests import factories


def _all_factories() -> list[type[DjangoModelFactory]]:
    return [
        obj
        for _, obj in inspect.getmembers(factories, inspect.isclass)
        if issubclass(obj, DjangoModelFactory) and obj is not DjangoModelFactory
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("factory_class", _all_factories(), ids=lambda f: f.__name__)
def test_factory_creates_a_valid_row(factory_class):
    obj = factory_class()
    # Model validation (field validators, check constraints) agrees with the database.
    obj.full_clean()
    assert type(obj)._default_manager.filter(pk=obj.pk).exists()


def test_every_model_has_a_factory():
    from django.apps import apps

    covered = {f._meta.model for f in _all_factories()}
    ours = [
        model for model in apps.get_models() if model._meta.app_label in ("pipelines", "reduction")
    ]
    missing = [model.__name__ for model in ours if model not in covered]
    assert missing == []
