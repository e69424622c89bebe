"""run_cancel and run_retry (behaviours 41, 42, 44) and two managers racing (behaviour 45)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.db import connection

from pipelines.backends.base import BackendError
from pipelines.models import ExecutedReductionStep, RunStatus, StateEvent
from pipelines.services.runs import (
    RunConflict,
    run_cancel,
    run_retry,
    run_submit,
    workflow_manager_tick,
)

from .workflow_fixtures import FakeBackend, World, fake_backend, world

__all__ = ["fake_backend"]  # a fixture, used by name


def submitted(w: World, **values: object) -> ExecutedReductionStep:
    run = w.run(**values)
    workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    return run_submit(run.pk, token=run.claim_token, owner="w")


@pytest.mark.django_db
@pytest.mark.parametrize("status", [RunStatus.PENDING, RunStatus.SUBMITTED, RunStatus.RUNNING])
def test_behaviour_41_cancelling_a_pending_submitted_or_running_run_cancels_its_job_once(
    tmp_path: Path, fake_backend: type[FakeBackend], status: str
) -> None:
    w = world(tmp_path)
    if status == RunStatus.PENDING:
        run = w.run()
    else:
        run = submitted(w)
        if status == RunStatus.RUNNING:
            ExecutedReductionStep.objects.filter(pk=run.pk).update(status=status)
            run.refresh_from_db()

    run = run_cancel(run, actor="operator")

    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and run.finished_at is not None
    assert FakeBackend.cancels == ([run.hpc_job_id] if run.hpc_job_id else [])
    with pytest.raises(RunConflict):
        run_cancel(run, actor="operator")
    assert len(FakeBackend.cancels) <= 1


@pytest.mark.django_db
def test_behaviour_42_a_backend_that_cannot_cancel_still_leaves_the_run_cancelled(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    run = submitted(world(tmp_path))
    FakeBackend.cancel_error = BackendError("scheduler unreachable")

    run_cancel(run, actor="operator")
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert FakeBackend.cancels == [run.hpc_job_id]
    assert "scheduler unreachable" in run.failure_reason


@pytest.mark.django_db
@pytest.mark.parametrize(
    "status",
    [
        RunStatus.STAGING_DATA,
        RunStatus.COLLECTING_RESULTS,
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
    ],
)
def test_behaviour_44_cancelling_any_other_state_is_a_conflict_and_changes_nothing(
    tmp_path: Path, fake_backend: type[FakeBackend], status: str
) -> None:
    run = world(tmp_path).run(status=status, hpc_job_id="fake:job")
    events = StateEvent.objects.count()
    with pytest.raises(RunConflict, match="only pending, submitted or running"):
        run_cancel(run, actor="operator")
    run.refresh_from_db()
    assert run.status == status
    assert StateEvent.objects.count() == events and FakeBackend.cancels == []


@pytest.mark.django_db
def test_a_manual_retry_of_a_run_failed_for_good_queues_its_next_attempt(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    run = w.run(status=RunStatus.FAILED, failed_for_good=True, retry_count=2, max_retries=2)
    run = run_retry(run, actor="operator")
    run.refresh_from_db()
    assert (run.status, run.failed_for_good, run.retry_count) == (RunStatus.PENDING, False, 3)
    assert run.max_retries == 3 + w.step.max_retries  # the step's budget again from here
    with pytest.raises(RunConflict, match="only failed runs"):
        run_retry(run, actor="operator")


@pytest.mark.django_db
def test_a_manual_retry_is_refused_when_another_run_occupies_the_sub_group(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    old = w.run(status=RunStatus.FAILED, failed_for_good=True, sub_group_key="s")
    newer = w.run(sub_group_key="s")
    with pytest.raises(RunConflict, match=f"run {newer.pk} already occupies"):
        run_retry(old, actor="operator")
    old.refresh_from_db()
    assert old.status == RunStatus.FAILED and old.failed_for_good


@pytest.mark.django_db(transaction=True)
def test_behaviour_45_two_managers_racing_on_a_pending_run_make_one_move_and_one_submission(
    tmp_path: Path, fake_backend: type[FakeBackend], require_postgres: None
) -> None:
    w = world(tmp_path)
    runs = [w.run(sub_group_key=f"s{i}") for i in range(6)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def manager(name: str) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                workflow_manager_tick(owner=name)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    def submitter(name: str) -> None:
        # Two submission workers racing on every run, each with the token it read.
        try:
            barrier.wait()
            for run in runs:
                fresh = ExecutedReductionStep.objects.get(pk=run.pk)
                if fresh.status == RunStatus.STAGING_DATA and fresh.idempotency_key:
                    try:
                        run_submit(fresh.pk, token=fresh.claim_token, owner=name)
                    except Exception as exc:
                        if "claim" not in str(exc):
                            raise
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=manager, args=(f"m{i}",)) for i in range(2)]
    threads += [threading.Thread(target=submitter, args=(f"s{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    for run in runs:  # whatever the race left claimed is submitted once more, idempotently
        fresh = ExecutedReductionStep.objects.get(pk=run.pk)
        if fresh.status == RunStatus.STAGING_DATA:
            run_submit(fresh.pk, token=fresh.claim_token, owner="last")

    for run in runs:
        claims = StateEvent.objects.filter(
            entity="executed_reduction_step",
            object_id=str(run.pk),
            from_state="pending",
            to_state="staging_data",
        ).count()
        assert claims == 1
        run.refresh_from_db()
        assert run.status == RunStatus.SUBMITTED
    assert sorted(FakeBackend.submits) == sorted(f"fake:run-{r.pk}-1" for r in runs)
