"""The "Deletion plan (dry run)" admin action on locations and on copies: the same verdicts as
``manage.py deletion_plan``, through the service, and nothing changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from pipelines.models import DeletionTask, PhysicalCopy, StateEvent
from tests.pipelines.test_deletion import make_world


def _run_action(client: Client, model: str, action: str, ids: list[int]) -> str:
    response = client.post(
        reverse(f"admin:pipelines_{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in ids]},
    )
    assert response.status_code == 200
    return response.content.decode()


@pytest.mark.django_db
def test_the_location_action_shows_the_plan_and_changes_nothing(
    admin_client: Client, tmp_path: Path
) -> None:
    world = make_world(tmp_path)
    before = (StateEvent.objects.count(), DeletionTask.objects.count())
    page = _run_action(admin_client, "datalocation", "show_deletion_plan", [world.obs_buffer.pk])
    assert "Deletion plan (dry run: nothing is changed)" in page
    assert "1 copy: 1 would be deleted, 0 kept" in page
    assert world.package.name in page
    assert "buffer package copy" in page
    assert (StateEvent.objects.count(), DeletionTask.objects.count()) == before
    assert set(PhysicalCopy.objects.values_list("status", flat=True)) == {"present"}


@pytest.mark.django_db
def test_the_copy_action_gives_each_selected_copy_its_first_keeping_rule(
    admin_client: Client, tmp_path: Path
) -> None:
    world = make_world(tmp_path)
    page = _run_action(
        admin_client,
        "physicalcopy",
        "show_deletion_plan",
        [world.lta_copy.pk, world.source_copies[0].pk],
    )
    assert "2 copies: 1 would be deleted, 1 kept (long_term_archive 1)" in page
    assert "long-term archive copies are never deleted by policy (arc:lta)" in page
