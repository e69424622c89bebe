"""The trigger manager (pipelines/services/triggers.py): behaviours 1-5 and 7-15 of the
workflow-manager brief (§8), each named after it, plus the gap semantics the issue adds (a
FAILED run awaiting its retry occupies its sub-group, a cancelled run is not re-created, an
IntegrityError never leaves a tick). SQLite by default; PostgreSQL with DATABASE_URL."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from unittest import mock

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.utils import timezone

from pipelines.models import (
    ExecutedReductionStep,
    PackageState,
    RunStatus,
    TriggerType,
)
from pipelines.services import triggers
from pipelines.services.triggers import (
    TriggerError,
    pipeline_evaluate,
    pipeline_trigger,
    step_gap,
)
from tests.factories import (
    DataLocationFactory,
    DataProductFactory,
    ExecutedObsUnitFactory,
    ExecutedReductionStepFactory,
    RawDataPackageFactory,
    ReductionSoftwareVersionFactory,
    ReductionStepConfigFactory,
    UserFactory,
)
from tests.pipelines.triggers_helpers import (
    archived,
    chain,
    finish,
    grouping_without_state_rule,
    inputs,
    pipeline,
    runs_of,
    step,
    tick,
)

pytestmark = pytest.mark.django_db


def test_behaviour_01_a_disabled_pipeline_never_gets_new_runs() -> None:
    off = pipeline(enabled=False)
    calibrate = step(off)
    archived()
    assert tick() == {"created": 0, "full": 0, "errors": 0}
    assert pipeline_evaluate(off, full=True) == []
    with pytest.raises(TriggerError, match="disabled"):
        pipeline_trigger(off)
    assert runs_of(calibrate) == []


def test_behaviour_02_a_pipeline_of_another_processing_location_is_ignored(settings) -> None:
    mine, theirs = pipeline(), pipeline()
    settings.PROCESSING_LOCATION_ID = mine.processing_location_id
    step_mine, step_theirs = step(mine), step(theirs)
    archived()
    tick()
    assert len(runs_of(step_mine)) == 1
    assert runs_of(step_theirs) == []
    assert pipeline_evaluate(theirs, full=True) == []


def test_processing_location_id_must_name_a_processing_location(settings) -> None:
    buffer = DataLocationFactory()
    settings.PROCESSING_LOCATION_ID = buffer.pk
    with pytest.raises(ImproperlyConfigured, match="not a PROCESSING location"):
        tick()


def test_unset_processing_location_id_means_the_only_one_or_every_one(settings) -> None:
    settings.PROCESSING_LOCATION_ID = None
    first = pipeline()
    assert triggers.processing_location_id() == first.processing_location_id
    pipeline()
    assert triggers.processing_location_id() is None  # several: the embedded facility serves all


def test_behaviour_03_every_run_the_trigger_manager_creates_starts_pending() -> None:
    p = pipeline()
    calibrate = step(p, max_retries=5, config=ReductionStepConfigFactory())
    package = archived()
    tick()
    (run,) = runs_of(calibrate)
    assert run.status == RunStatus.PENDING
    assert run.triggered_by == ExecutedReductionStep.TriggeredBy.AUTOMATIC
    assert run.max_retries == 5
    assert run.config_snapshot["parameters"] == {"calibration_mode": "hot_cold"}
    assert run.sub_group_values == {"executed_obs_unit": str(package.executed_obs_unit_id)}
    assert inputs(run) == {package.pk}


def test_behaviour_04_per_scan_grouping_creates_one_run_per_scan() -> None:
    p = pipeline()
    calibrate = step(p, group_by=["executed_obs_unit"])
    scans = [ExecutedObsUnitFactory() for _ in range(3)]
    for scan in scans:
        archived(scan)
        archived(scan)
    assert tick()["created"] == 3
    runs = runs_of(calibrate)
    assert len({r.sub_group_key for r in runs}) == 3
    assert all(len(inputs(r)) == 2 for r in runs)


def test_behaviour_05_empty_group_by_makes_one_sub_group_and_at_most_one_run() -> None:
    p = pipeline()
    combine = step(p, group_by=[])
    packages = [archived() for _ in range(4)]
    tick()
    (run,) = runs_of(combine)
    assert run.sub_group_key == "all"
    assert inputs(run) == {x.pk for x in packages}


def test_behaviour_07_a_second_evaluation_without_new_data_creates_nothing() -> None:
    p = pipeline()
    calibrate = step(p)
    archived()
    archived()
    assert tick()["created"] == 2
    for run in runs_of(calibrate):
        finish(run, RunStatus.COMPLETED)
    assert tick()["created"] == 0
    assert pipeline_evaluate(p, full=True) == []
    assert len(runs_of(calibrate)) == 2
    assert step_gap(calibrate) == {}


def test_behaviour_08_a_new_package_in_a_completed_sub_group_makes_a_new_run_over_all() -> None:
    p = pipeline()
    calibrate = step(p)
    scan = ExecutedObsUnitFactory()
    first = archived(scan)
    tick()
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.COMPLETED)
    second = archived(scan)
    assert set(step_gap(calibrate)) == {run.sub_group_key}
    assert tick()["created"] == 1
    new = runs_of(calibrate)[-1]
    assert new.sub_group_key == run.sub_group_key
    assert inputs(new) == {first.pk, second.pk}


def test_behaviour_09_cooldown_keeps_runs_of_a_sub_group_apart() -> None:
    p = pipeline()
    daily = step(p, cooldown_seconds=86400, group_by=[])
    start = timezone.now()
    archived(at=start)
    tick(start)
    for hour in range(1, 24):
        for run in runs_of(daily):
            if run.status == RunStatus.PENDING:
                finish(run, RunStatus.COMPLETED)
        at = start + timedelta(hours=hour)
        archived(at=at)
        tick(at)
    assert len(runs_of(daily)) == 1
    later = start + timedelta(hours=24, minutes=1)
    tick(later)
    assert len(runs_of(daily)) == 2


def test_behaviour_10_after_the_cooldown_a_gap_makes_exactly_one_run() -> None:
    p = pipeline()
    calibrate = step(p, cooldown_seconds=600)
    scan = ExecutedObsUnitFactory()
    archived(scan)
    start = timezone.now()
    tick(start)
    (first,) = runs_of(calibrate)
    finish(first, RunStatus.COMPLETED)
    archived(scan)
    assert tick(start + timedelta(seconds=30))["created"] == 0  # cooldown
    # Later ticks are incremental: the ended cooldown brings the sub-group back.
    assert tick(start + timedelta(seconds=601))["created"] == 1
    assert tick(start + timedelta(seconds=602))["created"] == 0
    assert len(runs_of(calibrate)) == 2


def test_behaviour_11_no_second_run_while_one_is_non_terminal() -> None:
    p = pipeline()
    calibrate = step(p)
    scan = ExecutedObsUnitFactory()
    archived(scan)
    tick()
    (run,) = runs_of(calibrate)
    for status in (RunStatus.STAGING_DATA, RunStatus.SUBMITTED, RunStatus.RUNNING):
        finish(run, status)
        archived(scan)
        assert tick()["created"] == 0
        assert pipeline_evaluate(p, full=True) == []
    assert len(runs_of(calibrate)) == 1
    with pytest.raises(IntegrityError), transaction.atomic():
        ExecutedReductionStepFactory(reduction_step=calibrate, sub_group_key=run.sub_group_key)


def test_a_failed_run_awaiting_its_retry_occupies_its_sub_group() -> None:
    p = pipeline()
    calibrate = step(p)
    scan = ExecutedObsUnitFactory()
    archived(scan)
    tick()
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.FAILED)  # not for good: the result manager will retry it
    newer = archived(scan)
    assert tick()["created"] == 0
    assert pipeline_evaluate(p, full=True) == []
    with pytest.raises(IntegrityError), transaction.atomic():
        ExecutedReductionStepFactory(reduction_step=calibrate, sub_group_key=run.sub_group_key)
    # Once it has failed for good, the sub-group is free, and only the new package reopened it.
    finish(run, RunStatus.FAILED, for_good=True)
    pipeline_evaluate(p, full=True)
    second = runs_of(calibrate)[-1]
    assert second.pk != run.pk
    assert newer.pk in inputs(second)


def test_a_cancelled_run_is_not_re_created_at_the_next_tick() -> None:
    p = pipeline()
    calibrate = step(p)
    archived()
    tick()
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.CANCELLED)
    assert tick()["created"] == 0
    assert pipeline_evaluate(p, full=True) == []
    assert runs_of(calibrate) == [run]


def test_an_integrity_error_from_a_racing_manager_never_leaves_the_tick(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.services.triggers")
    p = pipeline()
    calibrate = step(p, group_by=[])
    archived()
    # Another manager created the run between this manager's reading and its insert: this one
    # sees no run at all (its stale view) and inserts into an occupied sub-group.
    ExecutedReductionStepFactory(reduction_step=calibrate, sub_group_key="all")
    # The caller's transaction stays usable: the failed insert rolled back to its savepoint.
    stale = defaultdict(lambda: defaultdict(list))
    with (
        mock.patch.object(triggers.gap, "_runs_by_key", return_value={}),
        mock.patch.object(triggers.manager, "runs_of_steps", return_value=stale),
        transaction.atomic(),
    ):
        assert tick() == {"created": 0, "full": 1, "errors": 0}  # the batched full evaluation
        assert pipeline_evaluate(p, full=True) == []  # one pipeline at a time
        assert ExecutedReductionStep.objects.count() == 1
    assert len(runs_of(calibrate)) == 1
    assert caplog.text.count("not created, the sub-group is occupied") == 2


def _calibrate_and_combine(**kwargs):  # type: ignore[no-untyped-def]
    p = pipeline(**kwargs)
    calibrate = step(p, group_by=["executed_obs_unit"], step_order=1)
    combine = step(p, group_by=[], step_order=2, upstream=[calibrate])
    return p, calibrate, combine


def test_behaviour_12_a_downstream_step_waits_for_completed_upstream_runs() -> None:
    _p, calibrate, combine = _calibrate_and_combine()
    packages = [archived() for _ in range(3)]
    tick()
    calibrations = runs_of(calibrate)
    assert len(calibrations) == 3
    assert runs_of(combine) == []
    products = []
    for run in calibrations[:2]:
        finish(run, RunStatus.COMPLETED)
        products.append(DataProductFactory(produced_by=run))
        assert tick()["created"] == 0  # still waiting for the third scan's calibration
    finish(calibrations[2], RunStatus.COMPLETED)
    products.append(DataProductFactory(produced_by=calibrations[2]))
    assert tick()["created"] == 1
    (combined,) = runs_of(combine)
    assert inputs(combined) == {x.pk for x in packages}
    assert set(combined.input_products.values_list("pk", flat=True)) == {x.pk for x in products}
    assert combined.excluded_inputs == []


@pytest.mark.parametrize("ending", ["cancelled", "failed for good"])
def test_behaviour_13_data_whose_upstream_run_failed_or_was_cancelled_is_left_out(ending) -> None:
    _p, calibrate, combine = _calibrate_and_combine()
    good, bad = archived(), archived()
    tick()
    by_package = {next(iter(inputs(r))): r for r in runs_of(calibrate)}
    finish(by_package[good.pk], RunStatus.COMPLETED)
    if ending == "cancelled":
        finish(by_package[bad.pk], RunStatus.CANCELLED)
    else:
        finish(by_package[bad.pk], RunStatus.FAILED, for_good=True)
    tick()
    (combined,) = runs_of(combine)
    assert inputs(combined) == {good.pk}
    (left_out,) = combined.excluded_inputs
    assert left_out["package"] == bad.pk
    assert left_out["name"] == bad.name
    assert ending.split()[0] in left_out["reason"]


def test_behaviour_13_a_sub_group_whose_upstream_runs_all_failed_gets_no_run() -> None:
    p, calibrate, baseline = chain()
    archived()
    tick()
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.CANCELLED)
    assert tick()["created"] == 0
    assert pipeline_evaluate(p, full=True) == []
    assert runs_of(baseline) == []


def test_behaviour_14_a_manual_pipeline_runs_only_when_triggered() -> None:
    p = pipeline(trigger_type=TriggerType.MANUAL)
    calibrate = step(p)
    scans = [ExecutedObsUnitFactory() for _ in range(2)]
    for scan in scans:
        archived(scan)
    assert tick()["created"] == 0
    assert pipeline_evaluate(p, full=True) == []
    planned = pipeline_trigger(p, dry_run=True)
    assert len(planned) == 2 and all(d.run is None for d in planned)
    assert runs_of(calibrate) == []
    key = planned[0].key
    with pytest.raises(TriggerError, match="no sub-group 'nope'"):
        pipeline_trigger(p, sub_groups=["nope"])
    made = pipeline_trigger(p, sub_groups=[key], user=UserFactory())
    assert [d.run.sub_group_key for d in made if d.run] == [key]
    (run,) = runs_of(calibrate)
    assert run.triggered_by == ExecutedReductionStep.TriggeredBy.MANUAL
    assert tick()["created"] == 0  # the other scan still waits for a trigger


def test_behaviour_15_a_cron_pipeline_is_evaluated_once_per_due_time() -> None:
    p = pipeline(trigger_type=TriggerType.CRON, trigger_config={"cron": "0 3 * * *"})
    calibrate = step(p, group_by=[])
    day = (timezone.now() + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    archived(at=day)
    assert tick(day + timedelta(hours=2))["created"] == 0  # before the first due time
    assert tick(day + timedelta(hours=3, minutes=1))["created"] == 1
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.COMPLETED)
    archived(at=day + timedelta(hours=3, minutes=2))
    for minutes in (5, 30, 600):  # between due times: nothing, whatever arrives
        assert tick(day + timedelta(hours=3, minutes=minutes))["created"] == 0
    assert tick(day + timedelta(days=1, hours=3, minutes=1))["created"] == 1
    p.refresh_from_db()
    assert p.cron_last_due_at == day + timedelta(days=1, hours=3)


def test_each_cron_due_time_is_claimed_by_one_manager_only() -> None:
    p = pipeline(trigger_type=TriggerType.CRON, trigger_config={"cron": "*/5 * * * *"})
    later = timezone.now() + timedelta(minutes=6)
    other = type(p).objects.get(pk=p.pk)  # a second manager's copy
    assert triggers.manager._claim_cron_due(p, later) is True
    assert triggers.manager._claim_cron_due(other, later) is False


def test_only_archived_packages_count_when_the_rules_do_not_name_the_state() -> None:
    p = pipeline(data_grouping=grouping_without_state_rule())
    combine = step(p, group_by=[])
    ready = archived()
    RawDataPackageFactory(state=PackageState.TRANSFERRING)
    tick()
    (run,) = runs_of(combine)
    assert inputs(run) == {ready.pk}


def test_rules_that_name_the_state_decide_which_packages_count() -> None:
    p = pipeline()
    p.data_grouping.filter_rules = [
        {"table": "RawDataPackage", "column": "state", "operator": "in",
         "value": ["archived", "transferring"]},
    ]  # fmt: skip
    p.data_grouping.save()
    combine = step(p, group_by=[])
    ready = archived()
    moving = RawDataPackageFactory(state=PackageState.TRANSFERRING)
    tick()
    (run,) = runs_of(combine)
    assert inputs(run) == {ready.pk, moving.pk}


def test_pipelines_are_evaluated_by_priority() -> None:
    low = step(pipeline(priority=1, name="a-low"), group_by=[])
    high = step(pipeline(priority=9, name="z-high"), group_by=[])
    archived()
    tick()
    (first,) = runs_of(high)
    (second,) = runs_of(low)
    assert first.pk < second.pk


def test_runs_get_the_version_their_step_policy_resolves() -> None:
    p = pipeline()
    reference = ReductionSoftwareVersionFactory(version="1.2.0")
    software = reference.software
    ReductionSoftwareVersionFactory(software=software, version="1.10.0")
    ReductionSoftwareVersionFactory(software=software, version="2.0.0")
    ReductionSoftwareVersionFactory(software=software, version="1.11.0", is_active=False)
    compatible = step(p, software=software, software_version=reference, group_by=[])
    pinned = step(p, software=software, software_version=reference, version_policy="pinned")
    latest = step(p, software=software, version_policy="latest", group_by=[])
    archived()
    tick()
    assert runs_of(compatible)[0].software_version.version == "1.10.0"
    assert runs_of(pinned)[0].software_version == reference
    assert runs_of(latest)[0].software_version.version == "2.0.0"


def test_a_pipeline_whose_evaluation_fails_does_not_stop_the_others(caplog) -> None:
    broken = pipeline(priority=9)
    type(broken.data_grouping).objects.filter(pk=broken.data_grouping_id).update(
        filter_rules=[{"table": "Nope", "column": "x", "operator": "eq", "value": 1}]
    )  # edited around validation
    step(broken)
    fine = step(pipeline(priority=1))
    archived()
    assert tick() == {"created": 1, "full": 1, "errors": 1}
    assert len(runs_of(fine)) == 1
    assert f"evaluating pipeline {broken.name} failed" in caplog.text
    broken.refresh_from_db()
    assert broken.trigger_watermark is None  # looked at again next tick
    assert "is invalid, so no run can be made" in triggers.explain_step(broken.steps.get())
