"""Trigger manager: incremental evaluation from the watermark, the full re-evaluation as the
safety net, and the on-demand evaluation archiving queues (pipelines/services/triggers.py)."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from pipelines.models import ExecutedReductionStep, PackageState, Pipeline, RunStatus
from pipelines.services import triggers
from pipelines.services.archive import mark_archived
from pipelines.services.triggers import trigger_evaluate_now
from tests.factories import ExecutedObsUnitFactory, RawDataPackageFactory
from tests.pipelines.triggers_helpers import (
    archived,
    chain,
    finish,
    inputs,
    pipeline,
    runs_of,
    step,
    tick,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _local_cache(settings) -> None:  # type: ignore[no-untyped-def]
    # The coalescing key lives in the cache; the default DB cache table is not in the test DB.
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    from django.core.cache import cache

    cache.clear()


def test_the_first_evaluation_is_full_and_later_ones_incremental() -> None:
    p = pipeline()
    calibrate = step(p)
    archived()
    start = timezone.now()
    assert tick(start) == {"created": 1, "full": 1, "errors": 0}
    p.refresh_from_db()
    assert p.full_evaluation_at == start
    assert p.trigger_watermark == start - triggers.WATERMARK_LAG
    archived(at=start + timedelta(seconds=30))
    assert tick(start + timedelta(seconds=40)) == {"created": 1, "full": 0, "errors": 0}
    assert len(runs_of(calibrate)) == 2


def test_an_incremental_tick_only_sees_packages_archived_after_the_watermark(settings) -> None:
    settings.WORKFLOW_TRIGGER_FULL_INTERVAL = 3600
    p = pipeline()
    calibrate = step(p)
    start = timezone.now()
    tick(start)
    # Archived long before the watermark (its transaction committed late, say): the increments
    # cannot see it ...
    archived(at=start - timedelta(hours=1))
    assert tick(start + timedelta(minutes=5)) == {"created": 0, "full": 0, "errors": 0}
    assert runs_of(calibrate) == []
    # ... the full re-evaluation, once its interval passed, does.
    assert tick(start + timedelta(hours=1, seconds=1)) == {"created": 1, "full": 1, "errors": 0}
    assert len(runs_of(calibrate)) == 1


def test_an_incremental_tick_without_changes_costs_a_few_queries_whatever_the_pipelines() -> None:
    start = timezone.now()
    for cooldown in (0, 60, 60, 600, 600, 600):
        step(pipeline(), cooldown_seconds=cooldown)
        archived(at=start - timedelta(minutes=5))
    tick(start)
    with CaptureQueriesContext(connection) as few:
        assert tick(start + timedelta(seconds=10)) == {"created": 0, "full": 0, "errors": 0}
    # processing location, served pipelines, new packages, their steps' cooldowns, finished
    # runs, one per distinct cooldown (2), one watermark UPDATE: nothing per grouping when
    # nothing changed.
    assert len(few) == 8, [q["sql"][:80] for q in few.captured_queries]


def test_an_upstream_run_completing_brings_its_downstream_sub_group_back() -> None:
    _, calibrate, baseline = chain()
    scan = ExecutedObsUnitFactory()
    archived(scan)
    start = timezone.now()
    tick(start)
    (run,) = runs_of(calibrate)
    assert tick(start + timedelta(seconds=5))["created"] == 0
    finish(run, RunStatus.COMPLETED)
    assert tick(start + timedelta(seconds=10)) == {"created": 1, "full": 0, "errors": 0}
    (downstream,) = runs_of(baseline)
    assert downstream.sub_group_key == run.sub_group_key


def test_evaluating_downstream_of_a_finished_run_creates_only_its_sub_groups_runs() -> None:
    from pipelines.services.triggers import trigger_evaluate_downstream

    p, calibrate, baseline = chain()
    first, second = ExecutedObsUnitFactory(), ExecutedObsUnitFactory()
    archived(first)
    archived(second)
    start = timezone.now()
    tick(start)
    done, waiting = sorted(runs_of(calibrate), key=lambda r: r.pk)
    finish(done, RunStatus.COMPLETED)
    watermark = Pipeline.objects.get(pk=p.pk).trigger_watermark

    with CaptureQueriesContext(connection) as queries:
        assert trigger_evaluate_downstream([done.pk], owner="t") == {"created": 1}
    (downstream,) = runs_of(baseline)
    assert downstream.sub_group_key == done.sub_group_key
    assert set(downstream.input_raw_packages.all()) == set(done.input_raw_packages.all())
    # A few queries (the run, its step's dependants, inputs, pipelines, steps, the gap of that
    # sub-group and the new run), whatever else the facility holds; the watermark is the tick's.
    assert len(queries) < 40, [q["sql"][:80] for q in queries.captured_queries]
    assert Pipeline.objects.get(pk=p.pk).trigger_watermark == watermark
    # Again, or the tick after it: nothing more. A run that is not finished opens nothing.
    assert trigger_evaluate_downstream([done.pk], owner="t") == {"created": 0}
    assert trigger_evaluate_downstream([waiting.pk], owner="t") == {"created": 0}
    assert tick(start + timedelta(seconds=10))["created"] == 0
    assert len(runs_of(baseline)) == 1


def test_evaluating_downstream_ignores_disabled_pipelines_and_last_steps() -> None:
    from pipelines.services.triggers import trigger_evaluate_downstream

    p, calibrate, baseline = chain()
    archived()
    tick()
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.COMPLETED)
    Pipeline.objects.filter(pk=p.pk).update(enabled=False)
    assert trigger_evaluate_downstream([run.pk], owner="t") == {"created": 0}
    assert runs_of(baseline) == []
    Pipeline.objects.filter(pk=p.pk).update(enabled=True)
    assert trigger_evaluate_downstream([run.pk], owner="t") == {"created": 1}
    (last,) = runs_of(baseline)
    finish(last, RunStatus.COMPLETED)
    assert trigger_evaluate_downstream([last.pk], owner="t") == {"created": 0}


def test_a_manual_trigger_is_followed_by_its_downstream_steps() -> None:
    from pipelines.models import TriggerType
    from pipelines.services.triggers import pipeline_trigger

    p, calibrate, baseline = chain(trigger_type=TriggerType.MANUAL)
    archived()
    tick()
    pipeline_trigger(p)
    (run,) = runs_of(calibrate)
    finish(run, RunStatus.COMPLETED)
    tick()
    assert len(runs_of(baseline)) == 1


def test_archiving_a_package_queues_one_evaluation_after_commit(
    django_capture_on_commit_callbacks,
) -> None:
    p = pipeline()
    calibrate = step(p)
    first, second = (
        RawDataPackageFactory(state=PackageState.TRANSFERRING, executed_obs_unit=e)
        for e in (ExecutedObsUnitFactory(), ExecutedObsUnitFactory())
    )
    with mock.patch("pipelines.tasks.evaluate_triggers_now.delay") as send:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            mark_archived(first, actor="test", where="archive")
        assert send.call_count == 0  # nothing before the commit
        assert len(callbacks) == 1
        callbacks[0]()
        assert send.call_count == 1
        # A burst: while one evaluation is queued and has not started, no second is sent.
        with django_capture_on_commit_callbacks(execute=True):
            mark_archived(second, actor="test", where="archive")
        assert send.call_count == 1
        # The queued evaluation runs (the task's service) and evaluates the new packages ...
        assert trigger_evaluate_now(owner="test")["created"] == 2
        assert len(runs_of(calibrate)) == 2
        # ... and an archiving after it started queues the next one.
        third = RawDataPackageFactory(state=PackageState.TRANSFERRING)
        with django_capture_on_commit_callbacks(execute=True):
            mark_archived(third, actor="test", where="archive")
        assert send.call_count == 2
    assert Pipeline.objects.get(pk=p.pk).trigger_watermark is not None


def test_a_package_already_archived_queues_nothing(django_capture_on_commit_callbacks) -> None:
    package = archived()
    with (
        mock.patch("pipelines.tasks.evaluate_triggers_now.delay") as send,
        django_capture_on_commit_callbacks(execute=True) as callbacks,
    ):
        mark_archived(package, actor="test", where="archive")
    assert callbacks == [] and send.call_count == 0


def test_a_failing_send_never_fails_the_archiving(django_capture_on_commit_callbacks) -> None:
    package = RawDataPackageFactory(state=PackageState.TRANSFERRING)
    with (
        mock.patch("pipelines.tasks.evaluate_triggers_now.delay", side_effect=OSError("down")),
        django_capture_on_commit_callbacks(execute=True),
    ):
        mark_archived(package, actor="test", where="archive")
    package.refresh_from_db()
    assert package.state == PackageState.ARCHIVED


def test_the_on_demand_evaluation_never_starts_a_full_re_evaluation(settings) -> None:
    settings.WORKFLOW_TRIGGER_FULL_INTERVAL = 60
    p = pipeline()
    calibrate = step(p)
    start = timezone.now()
    tick(start)
    archived(at=start - timedelta(hours=2))  # only a full evaluation finds it
    assert trigger_evaluate_now(owner="test", now=start + timedelta(minutes=5))["full"] == 0
    assert runs_of(calibrate) == []
    assert tick(start + timedelta(minutes=5))["full"] == 1
    assert len(runs_of(calibrate)) == 1


def test_the_evaluate_triggers_now_task_routes_to_the_managers_queue() -> None:
    from pipelines.queues import MANAGERS_QUEUE, route_task

    assert route_task("pipelines.tasks.evaluate_triggers_now", [], {}, {}) == {
        "queue": MANAGERS_QUEUE
    }
    assert route_task("pipelines.tasks.run_trigger_manager", [], {}, {}) == {
        "queue": MANAGERS_QUEUE
    }


def test_the_trigger_manager_is_registered_and_scheduled(settings) -> None:
    from pipelines.managers import MANAGERS
    from pipelines.tasks import run_trigger_manager

    assert MANAGERS["trigger"] == "pipelines.services.triggers.trigger_manager_tick"
    entry = settings.CELERY_BEAT_SCHEDULE["run-trigger-manager"]
    assert entry["task"] == run_trigger_manager.name
    p = pipeline()
    calibrate = step(p)
    package = archived()
    assert run_trigger_manager() == {"created": 1, "full": 1, "errors": 0}
    assert inputs(runs_of(calibrate)[0]) == {package.pk}


@pytest.mark.parametrize("by_ids", [True, False], ids=["by id", "by archived_at"])
def test_new_packages_are_matched_to_groupings_a_batch_of_groupings_per_statement(
    monkeypatch, by_ids
) -> None:
    from pipelines.services.triggers import manager

    monkeypatch.setattr(manager, "MATCH_BATCH", 2)
    monkeypatch.setattr(manager, "MATCH_IDS", 100 if by_ids else 1)
    start = timezone.now()
    sources = []
    for i in range(5):
        p = pipeline()
        p.data_grouping.filter_rules = [
            {"table": "Source", "column": "name", "operator": "eq", "value": f"src-{i}"}
        ]
        p.data_grouping.save()
        sources.append(step(p))
    tick(start)
    scans = {i: ExecutedObsUnitFactory(obs_unit__source__name=f"src-{i}") for i in (1, 3)}
    made = {
        i: [archived(scans[i], at=start + timedelta(seconds=5)) for _ in range(2)] for i in scans
    }
    with CaptureQueriesContext(connection) as queries:
        assert tick(start + timedelta(seconds=10))["created"] == 2
    matching = [q for q in queries.captured_queries if "AS pipeline_id" in q["sql"]]
    assert len(matching) == 3  # five groupings, two per statement
    for i, s in enumerate(sources):
        runs = runs_of(s)
        if i in made:
            assert [inputs(r) for r in runs] == [{x.pk for x in made[i]}]
        else:
            assert runs == []


def test_a_full_re_evaluation_reads_a_batch_of_pipelines_in_a_few_statements() -> None:
    start = timezone.now()
    for _ in range(8):
        p = pipeline()
        calibrate = step(p, step_order=1)
        step(p, step_order=2, group_by=[], upstream=[calibrate])
    for _ in range(3):
        archived(at=start - timedelta(minutes=5))
    tick(start)
    for run in ExecutedReductionStep.objects.all():
        finish(run, RunStatus.COMPLETED)
    tick(start + timedelta(seconds=10))  # the combine runs
    Pipeline.objects.update(full_evaluation_at=None)
    with CaptureQueriesContext(connection) as queries:
        assert tick(start + timedelta(seconds=20)) == {"created": 0, "full": 8, "errors": 0}
    # location, pipelines, steps, dependencies, claim UPDATE + read-back, members, one split
    # per non-empty group_by, runs, watermark UPDATE, and the incremental part's (no pipeline
    # left: new packages, finished runs, cooldowns, UPDATE) -- nothing per pipeline.
    assert len(queries) <= 16, [q["sql"][:70] for q in queries.captured_queries]


def test_an_edited_grouping_is_matched_by_its_new_rules_at_once() -> None:
    from tests.factories import SourceFactory

    def scan(source):  # type: ignore[no-untyped-def]
        return ExecutedObsUnitFactory(obs_unit__source=source)

    old, new = SourceFactory(name="old"), SourceFactory(name="new")
    start = timezone.now()
    p = pipeline()
    p.data_grouping.filter_rules = [
        {"table": "Source", "column": "name", "operator": "eq", "value": "old"}
    ]
    p.data_grouping.save()
    calibrate = step(p)
    tick(start)
    archived(scan(old), at=start + timedelta(seconds=1))
    assert tick(start + timedelta(seconds=5))["created"] == 1
    type(p.data_grouping).objects.filter(pk=p.data_grouping_id).update(  # around save()
        filter_rules=[{"table": "Source", "column": "name", "operator": "eq", "value": "new"}]
    )
    archived(scan(old), at=start + timedelta(seconds=6))
    fresh = archived(scan(new), at=start + timedelta(seconds=6))
    assert tick(start + timedelta(seconds=10))["created"] == 1
    assert inputs(runs_of(calibrate)[-1]) == {fresh.pk}


def test_a_grouping_broken_after_its_first_evaluation_does_not_stop_the_others() -> None:
    start = timezone.now()
    broken, fine = pipeline(), pipeline()
    step(broken)
    fine_step = step(fine)
    tick(start)
    type(broken.data_grouping).objects.filter(pk=broken.data_grouping_id).update(
        filter_rules=[{"table": "Nope", "column": "x", "operator": "eq", "value": 1}]
    )
    archived(at=start + timedelta(seconds=5))
    assert tick(start + timedelta(seconds=10)) == {"created": 1, "full": 0, "errors": 1}
    assert len(runs_of(fine_step)) == 1
    broken.refresh_from_db()
    assert broken.trigger_watermark < start  # not advanced: looked at again
