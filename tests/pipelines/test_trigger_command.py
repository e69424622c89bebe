"""``manage.py trigger <pipeline>`` and the admin's "Trigger now" (issue 12 item 7): MANUAL
pipelines only, --sub-group to choose, --dry-run changes nothing, bad input is a clear error."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from pipelines.models import ExecutedReductionStep, TriggerType
from tests.factories import UserFactory

from .campaign_helpers import row_counts, scan_package, two_step_pipeline

pytestmark = pytest.mark.django_db


def trigger(*args: str) -> str:
    out = StringIO()
    call_command("trigger", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _manual():
    pipeline, calibrate, _combine = two_step_pipeline(trigger_type=TriggerType.MANUAL)
    packages = [scan_package(day) for day in (1, 2)]
    keys = [f"executed_obs_unit={p.executed_obs_unit_id}" for p in packages]
    return pipeline, calibrate, keys


def test_help_describes_the_command(capsys) -> None:
    with pytest.raises(SystemExit):
        call_command("trigger", "--help")
    out = capsys.readouterr().out
    assert "--sub-group" in out and "MANUAL" in out


def test_it_creates_a_manual_run_for_each_sub_group_of_the_first_step() -> None:
    pipeline, calibrate, keys = _manual()
    out = trigger(pipeline.name)
    runs = ExecutedReductionStep.objects.filter(reduction_step=calibrate)
    assert sorted(r.sub_group_key for r in runs) == sorted(keys)
    assert {r.triggered_by for r in runs} == {"manual"}
    assert f"{pipeline.name}: 2 run(s) created" in out
    # Triggered again: the data is covered, nothing new.
    assert f"{pipeline.name}: 0 run(s) created" in trigger(pipeline.name)


def test_sub_group_chooses_which_ones() -> None:
    pipeline, calibrate, keys = _manual()
    trigger(pipeline.name, "--sub-group", keys[1])
    assert list(
        ExecutedReductionStep.objects.filter(reduction_step=calibrate).values_list(
            "sub_group_key", flat=True
        )
    ) == [keys[1]]


def test_a_dry_run_prints_what_it_would_create_and_changes_nothing() -> None:
    pipeline, _calibrate, keys = _manual()
    before = row_counts()
    out = trigger(pipeline.name, "--dry-run")
    assert row_counts() == before
    assert f"calibrate [{keys[0]}]: would create" in out and "nothing changed" in out


@pytest.mark.parametrize("trigger_type", [TriggerType.CONTINUOUS, TriggerType.CRON])
def test_other_trigger_types_are_refused_clearly(trigger_type) -> None:
    config = {"cron": "0 3 * * *"} if trigger_type == TriggerType.CRON else {}
    pipeline, *_ = two_step_pipeline(trigger_type=trigger_type, trigger_config=config)
    scan_package(1)
    before = row_counts()
    with pytest.raises(CommandError, match="trigger is for MANUAL pipelines"):
        trigger(pipeline.name)
    assert row_counts() == before


def test_unknown_pipelines_and_sub_groups_are_refused_and_change_nothing() -> None:
    pipeline, _calibrate, _keys = _manual()
    before = row_counts()
    with pytest.raises(CommandError, match=f"MANUAL pipelines: {pipeline.name}"):
        trigger("nope")
    with pytest.raises(CommandError, match="no sub-group 'executed_obs_unit=0'"):
        trigger(pipeline.name, "--sub-group", "executed_obs_unit=0")
    assert row_counts() == before


def test_a_disabled_manual_pipeline_is_refused() -> None:
    pipeline, _calibrate, _keys = _manual()
    type(pipeline).objects.filter(pk=pipeline.pk).update(enabled=False)
    with pytest.raises(CommandError, match="is disabled"):
        trigger(pipeline.name)


def test_the_admin_triggers_manual_pipelines_and_names_the_others() -> None:
    manual, calibrate, _keys = _manual()
    continuous, *_ = two_step_pipeline()
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    response = client.post(
        reverse("admin:pipelines_pipeline_changelist"),
        {"action": "trigger_now", "_selected_action": [manual.pk, continuous.pk], "index": 0},
    )
    assert response.status_code == 302
    texts = [str(m) for m in get_messages(response.wsgi_request)]
    assert "Triggered: 2 run(s) created." in texts
    assert any(continuous.name in t and "only MANUAL" in t for t in texts)
    assert ExecutedReductionStep.objects.filter(reduction_step=calibrate).count() == 2
    assert not ExecutedReductionStep.objects.filter(reduction_step__pipeline=continuous).exists()
