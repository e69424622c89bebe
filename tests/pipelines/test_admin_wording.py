"""What an operator reads in the admin: constraint violations in words, objects labelled by
name, sizes a person can read, and the index grouped by topic."""

from __future__ import annotations

from typing import Any

import pytest
from django.apps import apps
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db import models
from django.test import Client
from django.urls import reverse

from access import OPERATORS, ensure_groups
from pipelines import models as m
from pipelines.admin.base import human_size
from pipelines.admin.site import TOPIC_APPS, TOPICS
from tests import factories as f


def _constraints() -> list[tuple[str, models.BaseConstraint]]:
    # Read at collection time, so constraints added later are covered too.
    return [
        (f"{model._meta.label}.{constraint.name}", constraint)
        for model in apps.get_app_config("pipelines").get_models()
        for constraint in model._meta.constraints
    ]


CONSTRAINTS = _constraints()


def test_the_pipelines_app_has_constraints_to_check():
    assert len(CONSTRAINTS) > 40


@pytest.mark.parametrize(("label", "constraint"), CONSTRAINTS, ids=[c[0] for c in CONSTRAINTS])
def test_every_constraint_says_what_is_wrong_in_words(label, constraint):
    message = constraint.get_violation_error_message()
    assert constraint.violation_error_message != constraint.default_violation_error_message, (
        f"{label} has no violation_error_message: operators would read its raw name"
    )
    assert constraint.name not in message
    assert message[0].isupper() and message.endswith(".")


def test_choices_checks_list_the_choices_by_label():
    constraint = next(
        c for c in m.PhysicalCopy._meta.constraints if c.name == "physical_copy_integrity_valid"
    )
    assert constraint.get_violation_error_message() == (
        "Integrity must be one of: Not verified yet, Checksum verified, Checksum mismatch, "
        "Missing on storage."
    )


@pytest.mark.django_db
def test_a_route_between_one_site_and_itself_is_refused_in_words():
    site = f.SiteFactory()
    route = m.DataTransferRoute(name="loop", origin_site=site, destination_site=site)
    with pytest.raises(ValidationError) as refused:
        route.full_clean()
    assert refused.value.messages == ["A route must go from one site to a different site."]


@pytest.mark.django_db
def test_a_second_file_at_the_same_path_is_refused_in_words():
    first = f.RawDataFileFactory()
    second = f.RawDataFileFactory.build(
        source_location=first.source_location,
        relative_path=first.relative_path,
        executed_obs_unit=first.executed_obs_unit,
        instrument_module=first.instrument_module,
    )
    with pytest.raises(ValidationError) as refused:
        second.full_clean()
    assert "A file with this path is already registered at this source location." in (
        refused.value.messages
    )


@pytest.fixture
def operator_client(db: None) -> Client:
    groups = ensure_groups()
    user = f.UserFactory(username="olga", is_staff=True)
    user.groups.add(groups[OPERATORS])
    client = Client()
    client.force_login(user)
    return client


def _admin_url(model: type[models.Model], view: str, *args: Any) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def test_the_admin_form_shows_the_message_of_a_violated_constraint(operator_client):
    site = f.SiteFactory()
    response = operator_client.post(
        _admin_url(m.DataTransferRoute, "add"),
        {
            "name": "loop",
            "origin_site": site.pk,
            "destination_site": site.pk,
            "route_type": "buffered",
            "method": "copy",
            "active": "on",
            "priority": 0,
        },
    )
    assert response.status_code == 200
    body = response.content.decode()
    assert "A route must go from one site to a different site." in body
    assert "data_transfer_route_distinct_sites" not in body
    assert admin.site.is_registered(m.DataTransferRoute)


# --- labels and sizes ----------------------------------------------------------------------------
@pytest.mark.django_db
def test_operation_labels_name_their_objects_and_locations():
    copy = f.PhysicalCopyFactory()
    location = str(copy.location)
    assert str(copy) == f"Raw data package copy at {location}: {copy.relative_path} [Present]"

    transfer = f.DataTransferFactory()
    assert str(transfer) == (
        f"{transfer.data_transfer_package.name}: {transfer.origin_location} -> "
        f"{transfer.destination_location}"
    )
    archive = f.LongTermArchiveTransferFactory()
    assert archive.raw_data_package.name in str(archive)
    assert str(archive.destination_location) in str(archive)

    job = f.StagingJobFactory(user=f.UserFactory(username="stella"))
    assert str(job) == f"staging for stella -> {job.destination_location}"

    deletion = f.DeletionTaskFactory()
    assert str(deletion) == f"delete {deletion.physical_copy}"
    assert ":" in str(deletion.physical_copy.location)


@pytest.mark.parametrize(
    ("num_bytes", "shown"),
    [
        (None, "-"),
        (0, "0 bytes"),
        (512, "512 bytes"),
        (65536, "65,536 (64.0 KiB)"),
        (5 * 1024**3, "5,368,709,120 (5.0 GiB)"),
        (3 * 1024**6, f"{3 * 1024**6:,} (3072.0 PiB)"),
    ],
)
def test_sizes_read_as_bytes_and_binary_units(num_bytes, shown):
    assert human_size(num_bytes) == shown


def test_the_file_list_shows_sizes_readable(operator_client):
    f.RawDataFileFactory(size=65536)
    response = operator_client.get(_admin_url(m.RawDataFile, "changelist"))
    assert "65,536 (64.0 KiB)" in response.content.decode()


def test_ingest_facts_are_read_only_after_ingest(operator_client):
    raw_file = f.RawDataFileFactory(size=65536)
    response = operator_client.get(_admin_url(m.RawDataFile, "change", raw_file.pk))
    form = response.context["adminform"].form
    for name in ("relative_path", "size", "checksum"):
        assert name not in form.fields
    assert "65,536 (64.0 KiB)" in response.content.decode()

    scan = f.ExecutedObsUnitFactory()
    response = operator_client.get(_admin_url(m.ExecutedObsUnit, "change", scan.pk))
    assert "start_time" not in response.context["adminform"].form.fields
    # Both are still entered when a row is added by hand.
    response = operator_client.get(_admin_url(m.ExecutedObsUnit, "add"))
    assert "start_time" in response.context["adminform"].form.fields
    response = operator_client.get(_admin_url(m.RawDataFile, "add"))
    assert {"relative_path", "size"} <= set(response.context["adminform"].form.fields)


# --- the index by topic --------------------------------------------------------------------------
def test_every_registered_pipelines_model_is_in_one_topic():
    placed = [label for labels in TOPICS.values() for label in labels]
    assert len(placed) == len(set(placed)), "a model is in two topics"
    registered = {
        model._meta.label for model in admin.site._registry if model._meta.app_label in TOPIC_APPS
    }
    assert registered - set(placed) == set(), "registered models in no topic of TOPICS"
    assert set(placed) - registered == set(), "TOPICS names models that are not registered"


@pytest.fixture
def superuser_client(db: None) -> Client:
    client = Client()
    client.force_login(f.UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def test_the_admin_index_groups_models_by_topic_and_links_the_reduction_pages(superuser_client):
    response = superuser_client.get(reverse("admin:index"))
    assert response.status_code == 200
    app_list = response.context["app_list"]
    names = [app["name"] for app in app_list]
    assert names[:7] == [
        "Observatory",
        "Data",
        "Locations",
        "Transfers",
        "Safety",
        "Workflow",
        "Audit",
    ]
    listed = {
        entry["model"]._meta.label
        for app in app_list
        for entry in app["models"]
        if "model" in entry
    }
    assert {model._meta.label for model in admin.site._registry} <= listed
    body = response.content.decode()
    assert f'href="{reverse("reduction:index")}"' in body
    # An app's own page still lists that app.
    response = superuser_client.get(reverse("admin:app_list", args=["pipelines"]))
    assert response.status_code == 200
    assert response.context["app_list"][0]["app_label"] == "pipelines"


def test_the_operator_index_shows_only_topics_with_models_they_may_see(operator_client):
    response = operator_client.get(reverse("admin:index"))
    assert response.status_code == 200
    for app in response.context["app_list"]:
        assert app["models"], f"{app['name']} is an empty group"
