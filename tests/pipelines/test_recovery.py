"""Lease recovery: abandoned claims are handed back, once, and never a newer claim."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from pipelines.models import (
    DataTransfer,
    LongTermArchiveTransfer,
    PackageState,
    RunStatus,
    Status,
)
from pipelines.services import recovery
from pipelines.tasks import recover_expired_leases
from tests import factories as f
from tests.pipelines.test_tasks import claimed_archive_row, events

pytestmark = pytest.mark.django_db


def _expired(minutes: int = 1) -> Any:
    return timezone.now() - timedelta(minutes=minutes)


def test_an_expired_claim_that_started_goes_back_to_pending_with_a_retry_used() -> None:
    row = claimed_archive_row(lease_owner="dead-host:42:1", lease_expires_at=_expired())

    counts = recover_expired_leases()

    assert counts["long_term_archive_transfer"] == 1
    row.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.PENDING, 1)
    assert (row.lease_owner, row.lease_expires_at, row.claim_token) == ("", None, "")
    assert "lease held by dead-host:42:1 expired" in row.failure_error_message
    [event] = events(row)
    assert (event.to_state, event.actor) == (Status.PENDING, "recovery")
    assert "expired" in event.reason


def test_an_expired_claim_that_never_started_costs_no_retry() -> None:
    # The task waited in the queue behind a backlog longer than the lease: it never ran, so the
    # row must not move closer to failing each time this happens.
    job = f.StagingJobFactory(
        status=Status.SCHEDULED,
        claim_token="t1",
        lease_owner="manager",
        lease_expires_at=_expired(),
        retry_count=3,
        max_retries=3,
    )

    counts = recover_expired_leases()

    assert counts["staging_job"] == 1
    job.refresh_from_db()
    assert (job.status, job.retry_count, job.claim_token) == (Status.PENDING, 3, "")
    assert job.failure_error_message == ""
    [event] = events(job)
    assert "never started" in event.reason and "no retry used" in event.reason


def test_a_backlog_many_leases_long_never_fails_a_row() -> None:
    job = f.StagingJobFactory(status=Status.PENDING, max_retries=1)
    for _ in range(5):
        type(job).objects.filter(pk=job.pk).update(
            status=Status.SCHEDULED, claim_token="t", lease_expires_at=_expired()
        )
        recover_expired_leases()
    job.refresh_from_db()
    assert (job.status, job.retry_count) == (Status.PENDING, 0)


def test_an_unexpired_lease_is_left_alone() -> None:
    row = claimed_archive_row(lease_expires_at=timezone.now() + timedelta(minutes=5))
    counts = recover_expired_leases()
    row.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.IN_PROGRESS, 0)
    assert counts["long_term_archive_transfer"] == 0
    assert events(row) == []


def test_an_expired_lease_with_no_retries_left_fails_the_row_and_its_package() -> None:
    row = claimed_archive_row(retry_count=3, max_retries=3, lease_expires_at=_expired())
    recover_expired_leases()
    row.refresh_from_db()
    assert row.status == Status.FAILED
    assert "gave up after 3 retries" in row.failure_error_message
    row.raw_data_package.refresh_from_db()
    assert row.raw_data_package.state == PackageState.FAILED


def test_an_abandoned_unpack_claim_is_recovered_on_the_unpack_phase() -> None:
    transfer = f.DataTransferFactory(
        status=Status.COMPLETED,
        unpack_status=Status.IN_PROGRESS,
        claim_token="unpacker",
        lease_owner="dead-unpacker",
        lease_expires_at=_expired(),
    )
    copying = f.DataTransferFactory(
        status=Status.IN_PROGRESS, claim_token="copier", lease_expires_at=_expired()
    )

    counts = recover_expired_leases()

    assert counts["data_transfer.unpack_status"] == 1
    assert counts["data_transfer"] == 1
    transfer.refresh_from_db()
    copying.refresh_from_db()
    assert (transfer.status, transfer.unpack_status) == (Status.COMPLETED, Status.PENDING)
    assert (transfer.unpack_retry_count, transfer.retry_count) == (1, 0)
    assert "dead-unpacker" in transfer.unpack_error_message
    assert (copying.status, copying.unpack_status, copying.retry_count) == (
        Status.PENDING,
        Status.PENDING,
        1,
    )


def test_a_staging_run_whose_manager_lease_expired_goes_back_to_pending() -> None:
    run = f.ExecutedReductionStepFactory(
        status=RunStatus.STAGING_DATA,
        lease_owner="workflow-manager:7",
        lease_expires_at=_expired(2),
    )
    fresh = f.ExecutedReductionStepFactory(
        status=RunStatus.STAGING_DATA,
        lease_owner="workflow-manager:8",
        lease_expires_at=timezone.now() + timedelta(minutes=2),
    )

    counts = recover_expired_leases()

    assert counts["executed_reduction_step"] == 1
    run.refresh_from_db()
    fresh.refresh_from_db()
    assert run.status == RunStatus.PENDING
    assert (run.lease_owner, run.lease_expires_at) == ("", None)
    [event] = events(run)
    assert (event.from_state, event.to_state) == (RunStatus.STAGING_DATA, RunStatus.PENDING)
    assert "workflow-manager:7" in event.reason
    assert fresh.status == RunStatus.STAGING_DATA


def test_recovery_twice_is_a_no_op_the_second_time() -> None:
    row = claimed_archive_row(lease_expires_at=_expired())
    recover_expired_leases()
    second = recover_expired_leases()
    row.refresh_from_db()
    assert row.retry_count == 1
    assert not any(second.values())


def test_recovery_leaves_a_row_that_was_reclaimed_after_it_was_listed(monkeypatch) -> None:
    row = claimed_archive_row(lease_owner="dead-host:42", lease_expires_at=_expired())
    real = recovery.operation_recover

    def reclaimed_meanwhile(stale: Any, **kwargs: Any) -> bool:
        # Between the listing and the move another recoverer handed the row back and a new
        # claim took it, with a new token and a fresh lease.
        LongTermArchiveTransfer.objects.filter(pk=stale.pk).update(
            claim_token="newer",
            lease_owner="worker-b:77",
            lease_expires_at=timezone.now() + timedelta(minutes=10),
            retry_count=1,
        )
        return real(stale, **kwargs)

    monkeypatch.setattr(recovery, "operation_recover", reclaimed_meanwhile)

    counts = recover_expired_leases()

    row.refresh_from_db()
    assert (row.status, row.retry_count, row.claim_token) == (Status.IN_PROGRESS, 1, "newer")
    assert events(row) == []
    assert counts["long_term_archive_transfer"] == 0


def test_recovery_leaves_a_row_whose_lease_was_renewed_by_a_new_claim_with_the_same_expiry(
    monkeypatch,
) -> None:
    # Even a new claim whose lease happens to be expired too is not the listed claim.
    row = claimed_archive_row(lease_expires_at=_expired())
    real = recovery.operation_recover

    def reclaimed(stale: Any, **kwargs: Any) -> bool:
        LongTermArchiveTransfer.objects.filter(pk=stale.pk).update(claim_token="newer")
        return real(stale, **kwargs)

    monkeypatch.setattr(recovery, "operation_recover", reclaimed)
    recover_expired_leases()
    row.refresh_from_db()
    assert (row.status, row.claim_token, row.retry_count) == (Status.IN_PROGRESS, "newer", 0)


def test_recovery_counts_only_the_rows_it_moved(monkeypatch) -> None:
    moved = claimed_archive_row(lease_owner="dead:1", lease_expires_at=_expired())
    settled = claimed_archive_row(lease_owner="dead:2", lease_expires_at=_expired())
    real = recovery.operation_recover

    def one_finished_meanwhile(stale: Any, **kwargs: Any) -> bool:
        if stale.pk == settled.pk:
            # The late worker completed it after the listing.
            LongTermArchiveTransfer.objects.filter(pk=stale.pk).update(status=Status.COMPLETED)
        return real(stale, **kwargs)

    monkeypatch.setattr(recovery, "operation_recover", one_finished_meanwhile)

    counts = recover_expired_leases()

    assert counts["long_term_archive_transfer"] == 1
    moved.refresh_from_db()
    settled.refresh_from_db()
    assert (moved.status, settled.status) == (Status.PENDING, Status.COMPLETED)


def test_a_claim_without_any_lease_is_recovered_once_it_is_older_than_a_lease(settings) -> None:
    # NULL < now is never true in SQL: without this, a claim written without a lease (a claimer's
    # bug, a hand edit) would stay in_progress forever.
    settings.WORKFLOW_LEASE_SECONDS = 600
    old = claimed_archive_row(lease_owner="", lease_expires_at=None)
    recent = f.StagingJobFactory(status=Status.SCHEDULED, lease_expires_at=None)
    run = f.ExecutedReductionStepFactory(status=RunStatus.STAGING_DATA, lease_expires_at=None)
    stale = timezone.now() - timedelta(seconds=601)
    LongTermArchiveTransfer.objects.filter(pk=old.pk).update(updated_at=stale)
    type(run).objects.filter(pk=run.pk).update(updated_at=stale)

    counts = recover_expired_leases()

    assert counts["long_term_archive_transfer"] == 1
    assert counts["staging_job"] == 0
    assert counts["executed_reduction_step"] == 1
    old.refresh_from_db()
    recent.refresh_from_db()
    run.refresh_from_db()
    assert (old.status, old.retry_count) == (Status.PENDING, 1)
    assert "no lease" in old.failure_error_message
    assert recent.status == Status.SCHEDULED
    assert run.status == RunStatus.PENDING


def test_a_pending_unpack_of_a_transfer_still_copying_is_not_touched() -> None:
    transfer = f.DataTransferFactory(status=Status.PENDING)
    recover_expired_leases()
    assert DataTransfer.objects.get(pk=transfer.pk).unpack_status == Status.PENDING


# --- manage.py recover ---------------------------------------------------------------------------
def test_recover_dry_run_lists_abandoned_claims_and_changes_nothing() -> None:
    from io import StringIO

    from django.core.management import call_command

    started = claimed_archive_row(lease_owner="dead-host:1", lease_expires_at=_expired())
    waiting = f.StagingJobFactory(
        status=Status.SCHEDULED, claim_token="t", lease_expires_at=_expired()
    )
    out = StringIO()

    call_command("recover", "--dry-run", stdout=out)

    text = out.getvalue()
    assert f"long_term_archive_transfer {started.pk} (in_progress, uses a retry)" in text
    assert f"staging_job {waiting.pk} (scheduled, no retry)" in text
    assert "dry run: 2 abandoned claim(s) would be recovered" in text
    started.refresh_from_db()
    waiting.refresh_from_db()
    assert (started.status, waiting.status) == (Status.IN_PROGRESS, Status.SCHEDULED)
    assert events(started) == [] and events(waiting) == []


def test_recover_moves_them_and_says_how_many() -> None:
    from io import StringIO

    from django.core.management import call_command

    row = claimed_archive_row(lease_expires_at=_expired())
    out = StringIO()
    call_command("recover", stdout=out)
    assert "recovered 1 claim(s) (long_term_archive_transfer: 1)" in out.getvalue()
    row.refresh_from_db()
    assert row.status == Status.PENDING
    [event] = events(row)
    assert event.actor == "manage.py recover"
    out = StringIO()
    call_command("recover", stdout=out)
    assert "recovered 0 claim(s) (nothing to recover)" in out.getvalue()


@pytest.mark.parametrize("value", ["0", "-1", "many", "100001"])
def test_recover_refuses_a_bad_batch_size(value: str) -> None:
    from django.core.management import CommandError, call_command

    row = claimed_archive_row(lease_expires_at=_expired())
    with pytest.raises(CommandError, match="--batch-size"):
        call_command("recover", "--batch-size", value)
    row.refresh_from_db()
    assert row.status == Status.IN_PROGRESS
