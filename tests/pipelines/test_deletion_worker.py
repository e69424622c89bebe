"""The deletion manager and worker: the worker's re-check and withdrawal, a copy left mid-deletion
by a dead worker or a task that gave up, two ticks at once, full locations first, and the plan
as a dry run."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from pipelines.models import (
    DataLocation,
    DeletionTask,
    PhysicalCopy,
    PhysicalCopyStatus,
    StateEvent,
    Status,
)
from pipelines.services.deletion import (
    RETRY_FAILED_AFTER,
    deletion_manager_tick,
    deletion_orphans_settle,
    deletion_plan,
    physical_copy_delete,
)
from pipelines.services.operations import operation_fail
from tests.pipelines.test_deletion import (
    drain,
    make_world,
    run_tasks,
    statuses,
)

CS = PhysicalCopyStatus
LT = DataLocation.LocationType


# --- the worker's re-check and its recoveries ----------------------------------------------------
@pytest.mark.django_db
def test_the_worker_withdraws_a_deletion_that_is_no_longer_safe(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)
    # The archive copy is found damaged after the deletion was scheduled.
    PhysicalCopy.objects.filter(pk=world.lta_copy.pk).update(
        integrity=PhysicalCopy.Integrity.MISMATCH
    )
    physical_copy_delete(task.pk, token=task.claim_token, owner="test")
    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    assert copy.status == CS.PRESENT
    assert world.path(copy).exists()
    task.refresh_from_db()
    assert task.status == Status.COMPLETED
    events = StateEvent.objects.filter(entity="physical_copy", object_id=str(copy.pk)).order_by(
        "pk"
    )
    assert events.last().reason.startswith("deletion withdrawn: only 0 of 1 required")


@pytest.mark.django_db
def test_damage_marked_between_the_decision_and_the_unlink_stops_the_deletion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision (DELETION_IN_PROGRESS) has committed when the only archive copy is found
    damaged: the last look under the lock keeps the file and withdraws the deletion."""
    from pipelines.services import deletion
    from pipelines.services.integrity import copy_mark_damaged

    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)

    def mark(name: str) -> None:
        if name == "deletion.mid_delete":
            copy_mark_damaged(
                PhysicalCopy.objects.get(pk=world.lta_copy.pk),
                PhysicalCopy.Integrity.MISMATCH,
                actor="test",
                reason="a byte flipped",
            )

    monkeypatch.setattr(deletion, "pause_point", mark)
    physical_copy_delete(task.pk, token=task.claim_token, owner="test")

    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    assert copy.status == CS.PRESENT
    assert world.path(copy).exists()
    assert statuses(copy) == [
        "deletion_scheduled",
        "deletion_in_progress",
        "deletion_failed",
        "present",
    ]
    task.refresh_from_db()
    assert task.status == Status.COMPLETED and task.idempotency_key.endswith(":withdrawn")


@pytest.mark.django_db
def test_a_copy_left_in_progress_by_a_dead_worker_is_finished_by_the_retried_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.services import deletion

    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)

    class Killed(BaseException):
        pass

    def die(name: str) -> None:
        if name != "deletion.mid_delete":
            return
        # The file is gone, then the worker dies before recording it.
        world.path(world.buffer_copy).unlink()
        raise Killed(name)

    monkeypatch.setattr(deletion, "pause_point", die)
    with pytest.raises(Killed):
        physical_copy_delete(task.pk, token=task.claim_token, owner="test")
    monkeypatch.undo()
    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    assert copy.status == CS.DELETION_IN_PROGRESS
    # Lease recovery hands the task back (one retry used); the next claim finishes the copy even
    # though the rules would now keep it: the decision was taken, the file may be gone.
    DeletionTask.objects.filter(pk=task.pk).update(lease_expires_at=timezone.now() - timedelta(1))
    from pipelines.services.recovery import recover_expired_leases

    assert recover_expired_leases()["deletion_task"] == 1
    PhysicalCopy.objects.filter(pk=world.lta_copy.pk).update(integrity="mismatch")
    deletion_manager_tick(owner="test")
    run_tasks()
    copy.refresh_from_db()
    assert copy.status == CS.DELETED
    assert statuses(copy) == ["deletion_scheduled", "deletion_in_progress", "deleted"]


@pytest.mark.django_db
def test_a_copy_whose_task_gave_up_mid_delete_becomes_failed_then_is_retried(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)
    from pipelines.services.operations import operation_start
    from pipelines.services.states import transition

    operation_start(task, token=task.claim_token, owner="dead")
    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    transition(copy, CS.DELETION_IN_PROGRESS, actor="dead", reason="deleting")
    operation_fail(
        DeletionTask, task.pk, token=task.claim_token, message="lost", actor="t", retryable=False
    )
    assert deletion_orphans_settle(actor="test") == 1
    copy.refresh_from_db()
    assert copy.status == CS.DELETION_FAILED
    assert f"deletion task {task.pk} ended failed" in copy.last_error
    drain(now=timezone.now() + RETRY_FAILED_AFTER * 2)
    copy.refresh_from_db()
    assert copy.status == CS.DELETED


@pytest.mark.django_db
def test_a_scheduled_copy_whose_task_failed_before_starting_gets_a_new_task(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)
    operation_fail(
        DeletionTask,
        task.pk,
        token=task.claim_token,
        message="no queue",
        actor="t",
        retryable=False,
    )
    assert deletion_orphans_settle(actor="test") == 1
    replacement = DeletionTask.objects.get(physical_copy=world.buffer_copy, status="pending")
    assert replacement.reason == task.reason
    assert PhysicalCopy.objects.get(pk=world.buffer_copy.pk).status == CS.DELETION_SCHEDULED
    assert deletion_orphans_settle(actor="test") == 0  # it has a live task again
    drain()
    assert PhysicalCopy.objects.get(pk=world.buffer_copy.pk).status == CS.DELETED


@pytest.mark.django_db
def test_two_ticks_schedule_each_copy_once(tmp_path: Path) -> None:
    make_world(tmp_path)
    first = deletion_manager_tick(owner="a")
    second = deletion_manager_tick(owner="b")
    assert first["scheduled"] == 3 and second["scheduled"] == 0
    assert DeletionTask.objects.count() == 3


@pytest.mark.django_db
def test_locations_not_accepting_writes_are_served_first(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    DataLocation.objects.filter(pk=world.obs_buffer.pk).update(accepting_writes=False)
    deletion_manager_tick(owner="test", limit=1)
    task = DeletionTask.objects.get()
    assert task.physical_copy_id == world.buffer_copy.pk
    plan = list(deletion_plan())
    assert plan[0].location == "obs:buffer"


# --- the plan ------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_the_plan_lists_every_live_copy_with_its_verdict_and_changes_nothing(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, archived_days_ago=2)
    before = (StateEvent.objects.count(), DeletionTask.objects.count())
    plan = {entry.copy_id: entry for entry in deletion_plan()}
    assert set(plan) == set(PhysicalCopy.objects.values_list("pk", flat=True))
    assert plan[world.lta_copy.pk].verdict.rule == "long_term_archive"
    assert plan[world.buffer_copy.pk].verdict.rule == "retention"
    assert plan[world.buffer_copy.pk].object_name == world.package.name
    later = timezone.now() + timedelta(days=10)
    plan = {e.copy_id: e for e in deletion_plan(now=later)}
    assert plan[world.buffer_copy.pk].verdict.deletable
    assert [e.copy_id for e in deletion_plan(location=world.lta)] == [world.lta_copy.pk]
    assert (StateEvent.objects.count(), DeletionTask.objects.count()) == before
    assert set(PhysicalCopy.objects.values_list("status", flat=True)) == {CS.PRESENT}
