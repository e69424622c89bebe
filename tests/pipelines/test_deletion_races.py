"""Deletion under concurrency, on PostgreSQL with real threads and connections: the package-row
lock (``copy_lock_object``) serialises a deletion start with an integrity failure and with other
deletions, so the last good copy survives whichever comes first."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction

from pipelines.models import DeletionTask, PhysicalCopy, PhysicalCopyStatus, StateEvent, Status
from pipelines.services.deletion import deletion_manager_tick, physical_copy_delete
from pipelines.services.integrity import copy_mark_damaged
from tests.pipelines.test_deletion import make_world, package_copy

CS = PhysicalCopyStatus
MISMATCH = PhysicalCopy.Integrity.MISMATCH


def _threads(*targets: Callable[[], Any]) -> list[BaseException]:
    """Run each target in its own thread (own database connection); return their errors."""
    errors: list[BaseException] = []

    def wrap(target: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported to the test
                errors.append(exc)
            finally:
                connection.close()

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def _event_pk(copy: PhysicalCopy, field: str, to_state: str) -> int | None:
    return (
        StateEvent.objects.filter(
            entity="physical_copy", object_id=str(copy.pk), field=field, to_state=to_state
        )
        .values_list("pk", flat=True)
        .first()
    )


def _good_archive_copies(package_id: int) -> int:
    return PhysicalCopy.objects.filter(
        raw_data_package_id=package_id,
        location__location_type="long_term_archive",
        status=CS.PRESENT,
        integrity=PhysicalCopy.Integrity.VERIFIED,
    ).count()


@pytest.mark.django_db(transaction=True)
def test_a_deletion_that_waits_on_an_integrity_failure_sees_it_and_withdraws(
    require_postgres: None, tmp_path: Path
) -> None:
    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)
    marked = threading.Event()

    def integrity_failure() -> None:
        # Holds the package-row lock for a while after marking the archive copy bad.
        with transaction.atomic():
            assert copy_mark_damaged(world.lta_copy, MISMATCH, actor="integrity", reason="bad")
            marked.set()
            time.sleep(0.5)

    def deletion() -> None:
        marked.wait(10)
        physical_copy_delete(task.pk, token=task.claim_token, owner="worker")

    assert _threads(integrity_failure, deletion) == []
    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    assert copy.status == CS.PRESENT  # the last good copy survives
    assert world.path(copy).exists()
    assert _event_pk(copy, "status", CS.DELETION_IN_PROGRESS) is None


@pytest.mark.django_db(transaction=True)
def test_a_deletion_racing_an_integrity_failure_never_removes_the_last_good_copy(
    require_postgres: None, tmp_path: Path
) -> None:
    """Many rounds with both moves released at once: whichever wins the lock, a deletion never
    starts after the archive copy was recorded bad."""
    for round_no in range(8):
        world = make_world(tmp_path / str(round_no))
        deletion_manager_tick(owner="test")
        task = DeletionTask.objects.get(physical_copy=world.buffer_copy)
        barrier = threading.Barrier(2)

        def integrity_failure(world: Any = world, barrier: Any = barrier) -> None:
            barrier.wait(10)
            copy_mark_damaged(world.lta_copy, MISMATCH, actor="integrity", reason="bad")

        def deletion(task: DeletionTask = task, barrier: Any = barrier) -> None:
            barrier.wait(10)
            physical_copy_delete(task.pk, token=task.claim_token, owner="worker")

        assert _threads(integrity_failure, deletion) == []
        copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
        started = _event_pk(copy, "status", CS.DELETION_IN_PROGRESS)
        damaged = _event_pk(world.lta_copy, "integrity", MISMATCH)
        assert damaged is not None
        if copy.status == CS.DELETED:
            # The deletion decided first, while the archive copy was still verified.
            assert started is not None and started < damaged
        else:
            assert copy.status == CS.PRESENT and started is None
            assert world.path(copy).exists()
        _cleanup()


def _cleanup() -> None:
    """Rounds share the database: retire the previous round's rows from the rules' view."""
    PhysicalCopy.objects.exclude(status=CS.DELETED).update(status=CS.DELETED)
    DeletionTask.objects.filter(status__in=("pending", "scheduled", "in_progress")).update(
        status=Status.FAILED
    )
    from pipelines.models import CopyRepair, DataLocation, Site

    CopyRepair.objects.filter(status__in=("pending", "scheduled", "in_progress")).update(
        status=Status.FAILED
    )
    # New sites per round: rename this round's so the next round may use the same names.
    for site in Site.objects.filter(short_name__in=("obs", "arc")):
        site.short_name = f"old{site.pk}"
        site.save()
    DataLocation.objects.update(active=False)


@pytest.mark.django_db(transaction=True)
def test_two_deletions_of_different_copies_and_two_managers_at_once_keep_the_archive_copy(
    require_postgres: None, tmp_path: Path
) -> None:
    world = make_world(tmp_path)
    arrived = package_copy(world.package, world.arc_buffer)
    world.write(arrived)
    barrier = threading.Barrier(2)

    def manager(name: str) -> Callable[[], None]:
        def tick() -> None:
            barrier.wait(10)
            deletion_manager_tick(owner=name)

        return tick

    assert _threads(manager("a"), manager("b")) == []
    # Each copy was scheduled once, by one of the two managers.
    assert DeletionTask.objects.count() == 4
    assert set(DeletionTask.objects.values_list("status", flat=True)) == {Status.SCHEDULED}
    tasks = list(DeletionTask.objects.order_by("pk"))
    barrier = threading.Barrier(len(tasks))

    def worker(task: DeletionTask) -> Callable[[], None]:
        def run() -> None:
            barrier.wait(10)
            physical_copy_delete(task.pk, token=task.claim_token, owner=f"w{task.pk}")

        return run

    assert _threads(*(worker(t) for t in tasks)) == []
    assert PhysicalCopy.objects.get(pk=arrived.pk).status == CS.DELETED
    assert PhysicalCopy.objects.get(pk=world.buffer_copy.pk).status == CS.DELETED
    assert _good_archive_copies(world.package.pk) == 1
    assert world.path(world.lta_copy).exists()
