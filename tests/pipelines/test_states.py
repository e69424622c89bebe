"""Every allowed transition of every stateful model works and writes its event; every other
move raises and changes nothing; racing callers produce exactly one winner."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import close_old_connections, connection
from django.db.models import F

from pipelines import models as m
from pipelines.services.states import (
    ForbiddenTransition,
    TransitionConflict,
    record_creation,
    transition,
)
from tests import factories as f

# (model, state field, factory building a row in a given state)
STATE_FIELDS: list[tuple[type[m.StatefulModel], str, Callable[[str], Any]]] = [
    (m.ExecutedObsUnit, "status", lambda s: f.ExecutedObsUnitFactory(status=s)),
    (m.RawDataPackage, "status", lambda s: f.RawDataPackageFactory(status=s)),
    (m.RawDataPackage, "state", lambda s: f.RawDataPackageFactory(state=s)),
    (m.DataTransferPackage, "status", lambda s: f.DataTransferPackageFactory(status=s)),
    (m.PhysicalCopy, "status", lambda s: f.PhysicalCopyFactory(status=s)),
    (m.PhysicalCopy, "integrity", lambda s: f.PhysicalCopyFactory(integrity=s)),
    (m.DataTransfer, "status", lambda s: f.DataTransferFactory(status=s)),
    # Unpacking only starts after the bundle arrived (check constraint), so build it completed.
    (
        m.DataTransfer,
        "unpack_status",
        lambda s: f.DataTransferFactory(status=m.Status.COMPLETED, unpack_status=s),
    ),
    (m.LongTermArchiveTransfer, "status", lambda s: f.LongTermArchiveTransferFactory(status=s)),
    (m.StagingJob, "status", lambda s: f.StagingJobFactory(status=s)),
    (m.DeletionTask, "status", lambda s: f.DeletionTaskFactory(status=s)),
    (m.CopyRepair, "status", lambda s: f.CopyRepairFactory(status=s)),
    (m.ExecutedReductionStep, "status", lambda s: f.ExecutedReductionStepFactory(status=s)),
    (m.Campaign, "state", lambda s: f.CampaignFactory(state=s)),
]


def _cases(allowed: bool) -> list[Any]:
    cases = []
    for model, field, build in STATE_FIELDS:
        table = model.TRANSITIONS[field]
        for source in table:
            for target in table:
                if (target in table[source]) is allowed:
                    cases.append(
                        pytest.param(
                            model,
                            field,
                            build,
                            source,
                            target,
                            id=f"{model.__name__}.{field}:{source}->{target}",
                        )
                    )
    return cases


def test_every_state_field_has_a_complete_transition_table():
    for model, field, _ in STATE_FIELDS:
        choices = {c for c, _ in model._meta.get_field(field).choices}
        table = model.TRANSITIONS[field]
        assert set(table) == choices, f"{model.__name__}.{field}: table keys != choices"
        for source, targets in table.items():
            assert targets <= choices, f"{model.__name__}.{field}: {source} -> unknown state"
            assert source not in targets, f"{model.__name__}.{field}: self-loop on {source}"


def test_every_stateful_model_is_covered_here():
    from django.apps import apps

    stateful = {
        (model, field)
        for model in apps.get_models()
        if issubclass(model, m.StatefulModel)
        for field in model.TRANSITIONS
    }
    assert stateful == {(model, field) for model, field, _ in STATE_FIELDS}


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "field", "build", "source", "target"), _cases(allowed=True))
def test_allowed_transition_moves_the_row_and_writes_one_event(model, field, build, source, target):
    row = build(source)
    transition(row, target, field=field, actor="tester", reason="because")

    assert getattr(row, field) == target
    row.refresh_from_db()
    assert getattr(row, field) == target
    events = list(m.StateEvent.objects.for_object(row))
    assert len(events) == 1
    event = events[0]
    assert (event.field, event.from_state, event.to_state) == (field, source, target)
    assert (event.actor, event.reason, event.entity) == ("tester", "because", model._meta.db_table)


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "field", "build", "source", "target"), _cases(allowed=False))
def test_forbidden_transition_raises_and_changes_nothing(model, field, build, source, target):
    row = build(source)
    before = model._default_manager.filter(pk=row.pk).values().get()

    with pytest.raises(ForbiddenTransition) as excinfo:
        transition(row, target, field=field, actor="tester")

    message = str(excinfo.value)
    assert repr(str(source)) in message and repr(str(target)) in message and "allowed" in message
    assert model._default_manager.filter(pk=row.pk).values().get() == before
    assert getattr(row, field) == source
    assert not m.StateEvent.objects.for_object(row).exists()


@pytest.mark.django_db
def test_unknown_target_state_is_refused_with_its_name():
    package = f.RawDataPackageFactory()
    with pytest.raises(ForbiddenTransition, match="'exploded' is not a status value"):
        transition(package, "exploded", actor="tester")
    with pytest.raises(ValueError, match="not a state field"):
        transition(package, "pending", field="name", actor="tester")


@pytest.mark.django_db
def test_stale_instance_loses_cleanly_when_the_row_moved_meanwhile():
    package = f.RawDataPackageFactory()
    stale = m.RawDataPackage.objects.get(pk=package.pk)
    transition(package, m.Status.SCHEDULED, actor="first")

    with pytest.raises(TransitionConflict, match="expected status='pending' but it is 'scheduled'"):
        transition(stale, m.Status.SCHEDULED, actor="second")

    assert m.StateEvent.objects.for_object(package).count() == 1
    assert m.StateEvent.objects.for_object(package).get().actor == "first"


@pytest.mark.django_db
def test_updates_apply_in_the_same_statement_and_expressions_are_reloaded():
    job = f.StagingJobFactory(status=m.Status.IN_PROGRESS, retry_count=1, lease_owner="w1")
    transition(
        job,
        m.Status.PENDING,
        actor="tester",
        updates={"retry_count": F("retry_count") + 1, "lease_owner": ""},
    )
    assert job.retry_count == 2 and job.lease_owner == ""
    job.refresh_from_db()
    assert (job.status, job.retry_count, job.lease_owner) == ("pending", 2, "")


@pytest.mark.django_db
def test_a_failing_update_rolls_back_the_state_change_and_its_event():
    from django.db import IntegrityError

    transfer = f.DataTransferFactory(status=m.Status.IN_PROGRESS)
    # retry_count is a positive integer column (a database check constraint).
    with pytest.raises(IntegrityError):
        transition(transfer, m.Status.PENDING, actor="tester", updates={"retry_count": -1})
    transfer.refresh_from_db()
    assert (transfer.status, transfer.retry_count) == (m.Status.IN_PROGRESS, 0)
    assert not m.StateEvent.objects.for_object(transfer).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("factory", "updates"),
    [
        ("DataTransferFactory", {"unpack_status": "scheduled"}),
        ("DataTransferFactory", {"status": "failed"}),
        ("RawDataPackageFactory", {"state": "archived"}),
    ],
)
def test_transition_refuses_to_write_a_state_field_as_a_side_update(factory, updates):
    # A state field moved as a side column would skip the table check and write no event.
    row = getattr(f, factory)(status=m.Status.IN_PROGRESS)
    before = {field: getattr(row, field) for field in updates}
    with pytest.raises(ValueError, match="may only move through transition"):
        transition(row, m.Status.PENDING, actor="tester", updates=updates)
    row.refresh_from_db()
    assert row.status == m.Status.IN_PROGRESS
    assert {field: getattr(row, field) for field in updates} == before
    assert not m.StateEvent.objects.for_object(row).exists()


@pytest.mark.django_db
def test_record_creation_writes_the_initial_state():
    run = f.ExecutedReductionStepFactory()
    event = record_creation(run, actor="trigger-manager", reason="new data")
    assert (event.from_state, event.to_state, event.object_id) == ("", "pending", str(run.pk))


def _one_round(
    pk: Any, model: type[Any], contenders: int, move: Callable[[Any], None]
) -> list[str]:
    """``contenders`` threads each load their own copy of row ``pk`` and call ``move`` at the
    same moment; returns "won"/"lost" per thread."""
    barrier = threading.Barrier(contenders)
    outcomes: list[str] = []
    lock = threading.Lock()

    def contend() -> None:
        try:
            mine = model._default_manager.get(pk=pk)
            barrier.wait(timeout=10)
            try:
                move(mine)
                outcome = "won"
            except TransitionConflict:
                outcome = "lost"
            with lock:
                outcomes.append(outcome)
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


def _race(
    rounds: int, contenders: int, build: Callable[[], Any], move: Callable[[Any], None]
) -> list[tuple[int, int]]:
    """Race ``contenders`` threads on a fresh row per round; return (winners, losers) per round."""
    results = []
    for _ in range(rounds):
        row = build()
        outcomes = _one_round(row.pk, type(row), contenders, move)
        assert len(outcomes) == contenders, outcomes
        results.append((outcomes.count("won"), outcomes.count("lost")))
    return results


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_two_threads_racing_on_one_transition_give_exactly_one_winner(require_postgres):
    results = _race(
        rounds=15,
        contenders=2,
        build=lambda: f.RawDataPackageFactory(status=m.Status.PENDING),
        move=lambda pkg: transition(pkg, m.Status.SCHEDULED, actor="racer"),
    )
    assert results == [(1, 1)] * 15
    assert m.StateEvent.objects.filter(to_state="scheduled").count() == 15


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_many_threads_racing_on_different_targets_still_give_one_winner(require_postgres):
    targets = [m.RunStatus.STAGING_DATA, m.RunStatus.CANCELLED]

    def move(run: m.ExecutedReductionStep) -> None:
        target = targets[threading.get_ident() % 2]
        transition(run, target, actor=f"racer-{threading.get_ident()}")

    results = _race(
        rounds=5, contenders=6, build=lambda: f.ExecutedReductionStepFactory(), move=move
    )
    assert results == [(1, 5)] * 5
    for run in m.ExecutedReductionStep.objects.all():
        assert m.StateEvent.objects.for_object(run).count() == 1


@pytest.mark.django_db
def test_a_where_condition_the_row_no_longer_matches_is_a_conflict():
    job = f.StagingJobFactory(status=m.Status.IN_PROGRESS, lease_owner="worker-b:2")

    with pytest.raises(TransitionConflict, match="no longer matches"):
        transition(job, m.Status.PENDING, actor="late", where={"lease_owner": "worker-a:1"})

    job.refresh_from_db()
    assert (job.status, job.lease_owner) == (m.Status.IN_PROGRESS, "worker-b:2")
    assert not m.StateEvent.objects.for_object(job).exists()
    transition(job, m.Status.PENDING, actor="owner", where={"lease_owner": "worker-b:2"})
    assert m.StateEvent.objects.for_object(job).get().actor == "owner"
