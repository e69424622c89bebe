"""Two trigger managers at once on PostgreSQL (threads, each with its own connection): no
duplicate runs, no error, whichever wins each sub-group. Skipped on SQLite (one writer at a
time there), failed under REQUIRE_SERVICES=1."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any
from unittest import mock

import pytest

from pipelines.models import ExecutedReductionStep, TriggerType
from pipelines.services import triggers
from pipelines.services.triggers import pipeline_evaluate, trigger_manager_tick
from tests.concurrency import together
from tests.factories import ExecutedObsUnitFactory
from tests.pipelines.triggers_helpers import archived, pipeline, step

pytestmark = pytest.mark.django_db(transaction=True)


def _no_duplicates() -> Counter[tuple[int, str]]:
    pairs = Counter(ExecutedReductionStep.objects.values_list("reduction_step_id", "sub_group_key"))
    assert pairs and max(pairs.values()) == 1, pairs
    return pairs


def test_two_trigger_managers_at_once_create_each_run_once(require_postgres) -> None:
    for _ in range(3):
        p = pipeline()
        step(p)
        step(p, group_by=[])
        for _ in range(10):
            archived(ExecutedObsUnitFactory())
    results = together(lambda: trigger_manager_tick(owner="t"))
    pairs = _no_duplicates()
    # Every pipeline's grouping takes every archived package: 30 scans and one "all" each.
    assert len(pairs) == 3 * (30 + 1)
    assert sum(r["created"] for r in results) == 3 * (30 + 1)


def test_two_managers_with_the_same_stale_view_lose_cleanly_to_the_constraint(
    require_postgres,
) -> None:
    """Both decide before either inserts (a barrier between deciding and creating), so every
    sub-group is inserted twice: the database keeps one, the loser skips it without error."""
    p = pipeline()
    s = step(p)
    for _ in range(20):
        archived(ExecutedObsUnitFactory())
    decided = threading.Barrier(2)
    original = triggers.manager.decide

    def decide_then_wait(*args: Any, **kwargs: Any) -> Any:
        decisions = original(*args, **kwargs)
        decided.wait(timeout=30)
        return decisions

    with mock.patch.object(triggers.manager, "decide", decide_then_wait):
        results = together(lambda: pipeline_evaluate(p, full=True))
    assert sorted(len(r) for r in results)[1] >= 1
    assert sum(len(r) for r in results) == 20
    assert ExecutedReductionStep.objects.filter(reduction_step=s).count() == 20
    _no_duplicates()


def test_two_managers_evaluate_a_cron_due_time_once(require_postgres) -> None:
    from datetime import timedelta

    from django.utils import timezone

    p = pipeline(trigger_type=TriggerType.CRON, trigger_config={"cron": "*/5 * * * *"})
    step(p, group_by=[])
    later = timezone.now() + timedelta(minutes=6)
    archived(at=later - timedelta(minutes=1))
    results = together(lambda: trigger_manager_tick(owner="t", now=later))
    assert sum(r["created"] for r in results) == 1
    _no_duplicates()
