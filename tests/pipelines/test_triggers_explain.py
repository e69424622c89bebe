"""``explain_step`` (pipelines/services/triggers.py): the one sentence ``manage.py why`` gives
for a (step, sub-group) that has no run yet, one test per reason."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command

from pipelines.models import RunStatus, TriggerType
from pipelines.services.triggers import explain_step
from tests.factories import DataGroupingFactory, ExecutedObsUnitFactory
from tests.pipelines.triggers_helpers import archived, chain, finish, pipeline, runs_of, step, tick

pytestmark = pytest.mark.django_db


def test_it_says_the_pipeline_is_disabled() -> None:
    s = step(pipeline(enabled=False, name="off"))
    assert "pipeline off is disabled" in explain_step(s)


def test_it_says_the_pipeline_belongs_to_another_processing_location(settings) -> None:
    mine, theirs = pipeline(), pipeline()
    settings.PROCESSING_LOCATION_ID = mine.processing_location_id
    sentence = explain_step(step(theirs))
    assert f"not at this instance's (PROCESSING_LOCATION_ID={mine.processing_location_id})" in (
        sentence
    )


def test_it_says_there_is_no_matching_data() -> None:
    grouping = DataGroupingFactory(
        name="ngc253",
        filter_rules=[
            {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
        ],
    )
    s = step(pipeline(data_grouping=grouping))
    archived()
    assert "no matching data: grouping ngc253 selects no archived package" in explain_step(s)
    assert "no matching data for sub-group 'x'" in explain_step(s, "x")


def test_it_says_the_next_evaluation_creates_a_run_for_a_gap() -> None:
    s = step(pipeline(), group_by=[])
    archived()
    archived()
    assert explain_step(s).endswith(
        "[all]: gap of 2 new packages: the next evaluation creates a run over all 2."
    )


def test_it_says_which_run_occupies_the_sub_group() -> None:
    s = step(pipeline(), group_by=[])
    archived()
    tick()
    (run,) = runs_of(s)
    archived()
    assert f"run {run.pk} is pending for this sub-group" in explain_step(s, "all")
    finish(run, RunStatus.FAILED)
    assert f"run {run.pk} failed and awaits its retry" in explain_step(s, "all")


def test_it_says_the_gap_is_empty() -> None:
    s = step(pipeline(), group_by=[])
    archived()
    tick()
    (run,) = runs_of(s)
    finish(run, RunStatus.CANCELLED)
    assert f"gap empty: all 1 packages are inputs of run {run.pk}" in explain_step(s)


def test_it_says_until_when_the_cooldown_lasts() -> None:
    s = step(pipeline(), group_by=[], cooldown_seconds=3600)
    archived()
    tick()
    (run,) = runs_of(s)
    finish(run, RunStatus.COMPLETED)
    archived()
    until = (run.created_at + timedelta(seconds=3600)).isoformat(timespec="seconds")
    assert f"gap of 1 new packages, in cooldown until {until}" in explain_step(s)


def test_it_names_the_upstream_run_it_waits_for() -> None:
    p = pipeline()
    calibrate = step(p, step_order=1)
    combine = step(p, group_by=[], step_order=2, upstream=[calibrate])
    archived()
    archived()
    tick()
    first, second = runs_of(calibrate)
    finish(first, RunStatus.COMPLETED)
    sentence = explain_step(combine)
    assert f"waiting for upstream run {second.pk} ({calibrate.name}, pending) to complete" in (
        sentence
    )


def test_it_says_upstream_data_is_left_out() -> None:
    _, calibrate, baseline = chain()
    archived()
    tick()
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.FAILED, for_good=True)
    assert f"upstream run {run.pk} of step {calibrate.name} failed for good" in explain_step(
        baseline, run.sub_group_key
    )


def test_it_says_no_upstream_run_completed_yet() -> None:
    p = pipeline()
    calibrate = step(p, step_order=1, cooldown_seconds=0)
    baseline = step(p, step_order=2, upstream=[calibrate])
    archived()
    expected = f"no package of it has a completed run of upstream step {calibrate.name} yet"
    assert expected in explain_step(baseline)


def test_it_says_a_manual_or_cron_pipeline_waits_for_its_trigger() -> None:
    manual = step(pipeline(trigger_type=TriggerType.MANUAL), group_by=[])
    cron = step(
        pipeline(trigger_type=TriggerType.CRON, trigger_config={"cron": "0 3 * * *"}), group_by=[]
    )
    archived()
    assert "pipeline is MANUAL: it runs only when someone triggers it" in explain_step(manual)
    assert "pipeline is CRON (0 3 * * *): evaluated next at" in explain_step(cron)


def test_it_summarises_a_step_with_several_sub_groups() -> None:
    s = step(pipeline())
    scans = [ExecutedObsUnitFactory() for _ in range(3)]
    for scan in scans:
        archived(scan)
    tick()
    finish(runs_of(s)[0], RunStatus.COMPLETED)
    assert explain_step(s).endswith(
        "3 sub-groups: 2 with a run in progress, 1 with an empty gap "
        "(give a sub-group key for details)."
    )


def test_manage_py_why_prints_the_step_sentence(capsys) -> None:
    s = step(pipeline(), group_by=[])
    archived()
    call_command("why", f"step:{s.pipeline.name}/{s.name}@all")
    assert "gap of 1 new packages" in capsys.readouterr().out
