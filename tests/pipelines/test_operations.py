"""The operation core: batch claims with tokens, start, renew, complete and reset, each
conditional on the claim; the append-only event table enforced by the database; and failure
reports that survive a dropped database connection."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import DatabaseError, OperationalError, connection, connections, transaction
from django.utils import timezone

from pipelines.models import LongTermArchiveTransfer, StagingJob, StateEvent, Status
from pipelines.services.operations import (
    ClaimLost,
    operation_claim_batch,
    operation_complete,
    operation_renew_lease,
    operation_reset,
    operation_start,
)
from pipelines.services.states import ForbiddenTransition
from tests import factories as f
from tests.pipelines.test_tasks import ArchiveTask, claimed_archive_row, events


# --- claim ---------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_batch_claim_takes_the_oldest_due_rows_with_one_token_and_one_event_each() -> None:
    jobs = [f.StagingJobFactory() for _ in range(4)]
    f.StagingJobFactory(status=Status.FAILED)

    claim = operation_claim_batch(StagingJob, owner="manager-a", limit=3)

    assert claim.ids == [job.pk for job in jobs[:3]]
    assert len(claim.token) == 32
    for job in jobs[:3]:
        job.refresh_from_db()
        assert (job.status, job.claim_token, job.lease_owner) == (
            Status.SCHEDULED,
            claim.token,
            "manager-a",
        )
        assert job.lease_expires_at > timezone.now()
        [event] = events(job)
        assert (event.from_state, event.to_state, event.reason) == (
            "pending",
            "scheduled",
            "claimed",
        )
    jobs[3].refresh_from_db()
    assert jobs[3].status == Status.PENDING


@pytest.mark.django_db
def test_a_second_claim_gets_only_what_is_left_and_a_different_token() -> None:
    for _ in range(3):
        f.StagingJobFactory()
    first = operation_claim_batch(StagingJob, owner="a", limit=2)
    second = operation_claim_batch(StagingJob, owner="b", limit=5)
    third = operation_claim_batch(StagingJob, owner="c", limit=5)
    assert len(first.ids) == 2 and len(second.ids) == 1 and third.ids == []
    assert not set(first.ids) & set(second.ids)
    assert first.token != second.token
    assert StateEvent.objects.filter(entity="staging_job", to_state="scheduled").count() == 3


@pytest.mark.django_db
def test_the_unpack_phase_is_claimed_only_after_the_copy_completed() -> None:
    from pipelines.models import DataTransfer

    done = f.DataTransferFactory(status=Status.COMPLETED)
    f.DataTransferFactory(status=Status.IN_PROGRESS)
    claim = operation_claim_batch(DataTransfer, owner="m", limit=10, field="unpack_status")
    assert claim.ids == [done.pk]
    done.refresh_from_db()
    assert (done.status, done.unpack_status) == (Status.COMPLETED, Status.SCHEDULED)


@pytest.mark.django_db(transaction=True)
def test_two_managers_claiming_at_once_never_claim_a_row_twice(require_postgres: None) -> None:
    ids = [f.StagingJobFactory().pk for _ in range(40)]
    results: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def claim(owner: str) -> None:
        try:
            barrier.wait(timeout=10)
            taken: list[int] = []
            for _ in range(10):
                taken += operation_claim_batch(StagingJob, owner=owner, limit=3).ids
            results[owner] = taken
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    taken = results["a"] + results["b"]
    assert len(taken) == len(set(taken)) == 40
    assert set(taken) == set(ids)
    assert StateEvent.objects.filter(entity="staging_job", to_state="scheduled").count() == 40


# --- start, renew, complete ----------------------------------------------------------------------
@pytest.mark.django_db
def test_the_holder_of_the_claim_starts_renews_and_completes_the_row() -> None:
    f.StagingJobFactory()
    claim = operation_claim_batch(StagingJob, owner="m", limit=1, lease_seconds=60)
    job = StagingJob.objects.get(pk=claim.ids[0])

    operation_start(job, token=claim.token, owner="worker-1", lease_seconds=60)
    assert (job.status, job.lease_owner) == (Status.IN_PROGRESS, "worker-1")
    assert job.started_at is not None
    before = job.lease_expires_at
    assert operation_renew_lease(StagingJob, job.pk, token=claim.token, lease_seconds=600)
    job.refresh_from_db()
    assert job.lease_expires_at > before

    operation_complete(job, token=claim.token, actor="worker-1", updates={"idempotency_key": "k"})
    job.refresh_from_db()
    assert (job.status, job.claim_token, job.lease_expires_at) == (Status.COMPLETED, "", None)
    assert job.idempotency_key == "k" and job.finished_at is not None
    assert [e.to_state for e in events(job)] == ["scheduled", "in_progress", "completed"]


@pytest.mark.django_db
def test_a_redelivered_task_whose_row_is_held_by_a_newer_claim_does_nothing() -> None:
    job = f.StagingJobFactory(status=Status.SCHEDULED, claim_token="newer")
    with pytest.raises(ClaimLost):
        operation_start(job, token="older", owner="w")
    job.refresh_from_db()
    assert (job.status, job.claim_token) == (Status.SCHEDULED, "newer")
    assert events(job) == []


@pytest.mark.django_db
def test_a_worker_that_lost_its_claim_cannot_renew_or_complete() -> None:
    job = f.StagingJobFactory(status=Status.IN_PROGRESS, claim_token="newer")
    assert not operation_renew_lease(StagingJob, job.pk, token="older")
    assert not operation_renew_lease(StagingJob, job.pk, token="")
    with pytest.raises(ClaimLost):
        operation_complete(job, token="older", actor="w")
    job.refresh_from_db()
    assert (job.status, job.claim_token) == (Status.IN_PROGRESS, "newer")
    with pytest.raises(ClaimLost):
        operation_complete(job, token="", actor="w")


@pytest.mark.django_db
def test_an_operator_reset_restores_the_retry_budget_of_a_failed_phase() -> None:
    transfer = f.DataTransferFactory(
        status=Status.COMPLETED,
        unpack_status=Status.FAILED,
        unpack_retry_count=3,
        unpack_error_message="tar: bad header",
    )
    operation_reset(transfer, actor="operator", reason="disk fixed", field="unpack_status")
    transfer.refresh_from_db()
    assert (transfer.unpack_status, transfer.unpack_retry_count) == (Status.PENDING, 0)
    assert transfer.unpack_error_message == ""
    with pytest.raises(ForbiddenTransition):
        operation_reset(transfer, actor="operator", reason="again", field="unpack_status")


# --- state_event is append-only in the database --------------------------------------------------
@pytest.mark.django_db
def test_the_database_refuses_to_rewrite_an_event_even_past_the_orm() -> None:
    job = f.StagingJobFactory()
    event = StateEvent.objects.create(
        entity="staging_job", object_id=str(job.pk), to_state="pending", actor="a", reason="r"
    )
    forged = StateEvent(
        id=event.id,
        entity="staging_job",
        object_id=str(job.pk),
        to_state="completed",
        actor="forger",
        reason="rewritten",
    )
    with pytest.raises(DatabaseError), transaction.atomic():
        StateEvent.objects.bulk_create(
            [forged],
            update_conflicts=True,
            unique_fields=["id"],
            update_fields=["to_state", "actor", "reason"],
        )
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE state_event SET reason = 'rewritten' WHERE id = %s", [event.id])
    stored = StateEvent.objects.get(pk=event.pk)
    assert (stored.to_state, stored.actor, stored.reason) == ("pending", "a", "r")


@pytest.mark.django_db
def test_postgresql_refuses_to_delete_an_event(require_postgres: None) -> None:
    event = StateEvent.objects.create(entity="x", object_id="1", to_state="a", actor="a")
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM state_event WHERE id = %s", [event.id])
    assert StateEvent.objects.filter(pk=event.pk).exists()


# --- a failure report after the database connection was dropped ----------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_failure_is_recorded_even_after_the_database_dropped_the_connection(
    require_postgres: None,
) -> None:
    row = claimed_archive_row(lease_expires_at=timezone.now() + timedelta(minutes=10))
    # The server (or an operator, or a failover) ends this worker's database session mid-task.
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        other.close()
    # The task's own next query fails on the dead connection, and the task raises.
    with pytest.raises(DatabaseError), connection.cursor() as cursor:
        cursor.execute("SELECT 1")

    ArchiveTask().on_failure(
        OperationalError("server closed the connection unexpectedly"),
        "t",
        (row.pk,),
        {"claim_token": "claim-token-of-this-run"},
        None,
    )

    stored: Any = LongTermArchiveTransfer.objects.get(pk=row.pk)
    assert (stored.status, stored.retry_count, stored.claim_token) == (Status.PENDING, 1, "")
    assert "server closed the connection" in stored.failure_error_message


# --- leases that hold during long I/O ------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_lease_keeper_renews_the_lease_while_the_work_runs() -> None:
    import time

    from pipelines.services.operations import LeaseKeeper

    job = f.StagingJobFactory(status=Status.IN_PROGRESS, claim_token="mine")
    StagingJob.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now())
    with LeaseKeeper(StagingJob, job.pk, token="mine", lease_seconds=3) as keeper:
        # Renewal every lease/3 = 1 s: after 2.5 s the lease reaches past now + 1.5 s.
        time.sleep(2.5)
        keeper.check()
        job.refresh_from_db()
        assert job.lease_expires_at > timezone.now() + timedelta(seconds=1.5)
    assert not keeper.lost.is_set()


@pytest.mark.django_db(transaction=True)
def test_a_lease_keeper_stops_the_work_once_the_claim_is_taken_over() -> None:
    import time

    from pipelines.services.operations import LeaseKeeper

    job = f.StagingJobFactory(status=Status.IN_PROGRESS, claim_token="mine")
    with LeaseKeeper(StagingJob, job.pk, token="mine", lease_seconds=3) as keeper:
        keeper.check()
        # Recovery handed the row back and a new claim took it.
        StagingJob.objects.filter(pk=job.pk).update(claim_token="newer")
        assert keeper.lost.wait(timeout=5)
        with pytest.raises(ClaimLost, match="lease lost"):
            keeper.check()
        time.sleep(0.1)
    job.refresh_from_db()
    assert (job.status, job.claim_token) == (Status.IN_PROGRESS, "newer")
