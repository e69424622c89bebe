"""The task base class: which row a failure report is about, which claim it comes from, and what
it does to the row (retry, fail for good, or nothing). Task methods are called directly."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from pipelines.exceptions import (
    ChecksumMismatch,
    NonRetryableError,
    StorageUnavailable,
    UnsafePath,
    is_retryable,
)
from pipelines.models import (
    DataTransfer,
    LongTermArchiveTransfer,
    PackageState,
    StagingJob,
    StateEvent,
    Status,
)
from pipelines.tasks import OperationTask, worker_identity
from tests import factories as f

MINE = "claim-token-of-this-run"


class ArchiveTask(OperationTask):
    """A worker task bound to LongTermArchiveTransfer rows, as the archive worker will be."""

    name = "tests.pipelines.archive_task"
    operation_model = LongTermArchiveTransfer


class UnpackTask(OperationTask):
    name = "tests.pipelines.unpack_task"
    operation_model = DataTransfer
    state_field = "unpack_status"


@pytest.fixture
def task() -> ArchiveTask:
    return ArchiveTask()


def claimed_archive_row(**kwargs: Any) -> LongTermArchiveTransfer:
    """A row claimed by the run whose failure the tests report (token ``MINE``)."""
    defaults: dict[str, Any] = {
        "status": Status.IN_PROGRESS,
        "claim_token": MINE,
        "lease_owner": worker_identity(),
        "lease_expires_at": timezone.now() + timedelta(minutes=10),
    }
    row: LongTermArchiveTransfer = f.LongTermArchiveTransferFactory(**{**defaults, **kwargs})
    return row


def events(instance: Any, field: str = "status") -> list[StateEvent]:
    return list(StateEvent.objects.for_object(instance).filter(field=field).order_by("id"))


def report(task: OperationTask, exc: BaseException, row_id: Any, token: str | None = MINE) -> None:
    kwargs = {} if token is None else {"claim_token": token}
    task.on_failure(exc, "task-id", (row_id,), kwargs, None)


def test_operation_task_class_attributes() -> None:
    assert ArchiveTask.acks_late is True
    assert ArchiveTask.reject_on_worker_lost is True
    assert ArchiveTask.track_started is True
    assert ArchiveTask.serializer == "json"
    assert OperationTask.abstract is True
    # Retries are counted on the row; Celery itself never re-sends.
    assert ArchiveTask.max_retries == 0


def test_the_worker_identity_tells_threads_of_one_process_apart() -> None:
    import threading

    names: list[str] = []
    thread = threading.Thread(target=lambda: names.append(worker_identity()))
    thread.start()
    thread.join()
    assert names[0] != worker_identity()


@pytest.mark.django_db
def test_get_retry_count_reads_the_row_of_the_tasks_phase(task: ArchiveTask) -> None:
    row = claimed_archive_row(retry_count=2)
    assert task.get_retry_count(row.pk) == 2
    transfer = f.DataTransferFactory(status=Status.COMPLETED, retry_count=1, unpack_retry_count=3)
    assert UnpackTask().get_retry_count(transfer.pk) == 3


@pytest.mark.django_db
def test_a_task_without_operation_model_says_so() -> None:
    class Unbound(OperationTask):
        name = "tests.pipelines.unbound"

    with pytest.raises(TypeError, match="declares no operation_model"):
        Unbound().get_retry_count(1)


@pytest.mark.django_db
def test_a_retryable_failure_resets_the_row_to_pending(task: ArchiveTask) -> None:
    row = claimed_archive_row()

    report(task, OSError(28, "No space left on device"), row.pk)

    row.refresh_from_db()
    assert row.status == Status.PENDING
    assert row.retry_count == 1
    assert row.failure_error_message.startswith("OSError: ")
    assert "No space left on device" in row.failure_error_message
    assert (row.lease_owner, row.lease_expires_at, row.claim_token) == ("", None, "")
    [event] = events(row)
    assert (event.from_state, event.to_state) == (Status.IN_PROGRESS, Status.PENDING)
    assert event.actor == "task:tests.pipelines.archive_task"
    assert "No space left on device" in event.reason
    # The package is untouched while retries remain.
    row.raw_data_package.refresh_from_db()
    assert row.raw_data_package.state == PackageState.WAITING


@pytest.mark.django_db
def test_the_operation_id_may_come_as_a_keyword(task: ArchiveTask) -> None:
    row = claimed_archive_row(status=Status.SCHEDULED)
    task.on_failure(
        StorageUnavailable("archive mount missing"),
        "task-2",
        (),
        {"long_term_archive_transfer_id": row.pk, "claim_token": MINE},
        None,
    )
    row.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.PENDING, 1)
    assert row.failure_error_message == "StorageUnavailable: archive mount missing"


@pytest.mark.django_db
def test_after_max_retries_the_row_and_its_package_fail(task: ArchiveTask, caplog) -> None:
    row = claimed_archive_row(retry_count=3, max_retries=3)

    with caplog.at_level("ERROR", logger="pipelines.alerts"):
        report(task, ChecksumMismatch("sha256 differs at archive"), row.pk)

    row.refresh_from_db()
    assert row.status == Status.FAILED
    assert row.retry_count == 3
    assert "sha256 differs at archive" in row.failure_error_message
    assert "gave up after 3 retries" in row.failure_error_message
    assert row.finished_at is not None
    assert (row.lease_owner, row.claim_token) == ("", "")
    package = row.raw_data_package
    package.refresh_from_db()
    assert package.state == PackageState.FAILED
    [package_event] = events(package, field="state")
    assert (package_event.from_state, package_event.to_state) == ("waiting", "failed")
    assert f"long_term_archive_transfer {row.pk}" in package_event.reason
    assert "gave up after 3 retries" in package_event.reason
    assert any("failed permanently" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_retries_are_used_up_one_failure_at_a_time(task: ArchiveTask) -> None:
    row = claimed_archive_row(max_retries=2)
    for expected in (1, 2):
        report(task, OSError("flaky"), row.pk)
        row.refresh_from_db()
        assert (row.status, row.retry_count) == (Status.PENDING, expected)
        # The manager claims the reset row again, with a new token the next run carries.
        LongTermArchiveTransfer.objects.filter(pk=row.pk).update(
            status=Status.IN_PROGRESS, claim_token=MINE
        )
    report(task, OSError("flaky"), row.pk)
    row.refresh_from_db()
    assert row.status == Status.FAILED


@pytest.mark.django_db
@pytest.mark.parametrize(
    "exc",
    [
        NonRetryableError("no credentials configured for location lta_s3"),
        UnsafePath("../../etc/passwd escapes the location root"),
        ValueError("a defect fails the same way every time"),
    ],
)
def test_a_non_retryable_error_fails_at_once(task: ArchiveTask, exc: Exception) -> None:
    row = claimed_archive_row(retry_count=0, max_retries=3)

    report(task, exc, row.pk)

    row.refresh_from_db()
    assert row.status == Status.FAILED
    assert row.retry_count == 0
    assert str(exc) in row.failure_error_message
    assert "gave up" not in row.failure_error_message
    row.raw_data_package.refresh_from_db()
    assert row.raw_data_package.state == PackageState.FAILED


@pytest.mark.django_db
@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED, Status.PENDING])
def test_a_failure_report_for_a_settled_row_changes_nothing(task: ArchiveTask, status: str) -> None:
    row = claimed_archive_row(status=status, retry_count=1, failure_error_message="")

    report(task, OSError("late report from a duplicate delivery"), row.pk)

    row.refresh_from_db()
    assert row.status == status
    assert row.retry_count == 1
    assert row.failure_error_message == ""
    assert events(row) == []
    row.raw_data_package.refresh_from_db()
    assert row.raw_data_package.state == PackageState.WAITING


@pytest.mark.django_db
def test_an_archived_package_stays_archived_when_a_second_archive_copy_fails(
    task: ArchiveTask,
) -> None:
    package = f.RawDataPackageFactory(state=PackageState.ARCHIVED)
    row = claimed_archive_row(raw_data_package=package)
    report(task, NonRetryableError("bucket policy denies writes"), row.pk)
    row.refresh_from_db()
    package.refresh_from_db()
    assert row.status == Status.FAILED
    assert package.state == PackageState.ARCHIVED


@pytest.mark.django_db
def test_failure_handling_never_raises(task: ArchiveTask, caplog) -> None:
    # The row is gone: the original error must still be the one Celery reports.
    report(task, OSError("boom"), 987654321)
    assert any("does not exist" in r.getMessage() for r in caplog.records)
    task.on_failure(OSError("boom"), "t", (), {}, None)
    assert any("without an operation id" in r.getMessage() for r in caplog.records)


# --- which errors are worth another try ----------------------------------------------------------
def _redis_errors() -> list[BaseException]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return [RedisConnectionError("Connection refused"), RedisTimeoutError("Timeout reading")]


def _transient() -> list[BaseException]:
    from billiard.exceptions import SoftTimeLimitExceeded
    from django.db import InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerError

    return [
        OSError("disk"),
        TimeoutError(),
        ConnectionResetError(),
        OperationalError("server closed the connection"),
        InterfaceError("connection already closed"),
        BrokerError("broker unreachable"),
        subprocess.CalledProcessError(23, ["rsync", "a", "b"]),
        subprocess.TimeoutExpired(["tar", "-cf", "x.tar"], 30),
        SoftTimeLimitExceeded(),
        ChecksumMismatch("x"),
        StorageUnavailable("x"),
        *_redis_errors(),
    ]


@pytest.mark.parametrize("exc", _transient(), ids=lambda e: type(e).__name__)
def test_a_transient_error_is_retryable(exc: BaseException) -> None:
    assert is_retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [NonRetryableError("x"), UnsafePath("x"), KeyError("x"), ValueError("x"), TypeError("x")],
    ids=lambda e: type(e).__name__,
)
def test_a_defect_or_bad_input_is_not_retryable(exc: BaseException) -> None:
    assert not is_retryable(exc)


@pytest.mark.django_db
def test_a_redis_hiccup_resets_the_row_instead_of_failing_it(task: ArchiveTask) -> None:
    row = claimed_archive_row()
    report(task, _redis_errors()[0], row.pk)
    row.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.PENDING, 1)


# --- which row a failure report is about ---------------------------------------------------------
@pytest.mark.django_db
def test_the_operation_id_keyword_is_found_by_name_not_by_position(task: ArchiveTask) -> None:
    # Keyword order is the caller's: another integer keyword first must not be taken for the id.
    bystander = claimed_archive_row()
    row = claimed_archive_row()

    task.on_failure(
        OSError("flaky"),
        "t",
        (),
        {"attempt": bystander.pk, "long_term_archive_transfer_id": row.pk, "claim_token": MINE},
        None,
    )

    row.refresh_from_db()
    bystander.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.PENDING, 1)
    assert (bystander.status, bystander.retry_count) == (Status.IN_PROGRESS, 0)
    assert events(bystander) == []


@pytest.mark.django_db
def test_a_task_with_a_run_signature_names_its_id_parameter() -> None:
    class StageTask(OperationTask):
        name = "tests.pipelines.stage_task"
        operation_model = StagingJob

        def run(self, staging_job_id: int, verbose: bool = False) -> None:  # pragma: no cover
            raise NotImplementedError

    job = f.StagingJobFactory(status=Status.IN_PROGRESS, claim_token=MINE)
    StageTask().on_failure(
        OSError("mount gone"),
        "t",
        (),
        {"verbose": True, "staging_job_id": job.pk, "claim_token": MINE},
        None,
    )
    job.refresh_from_db()
    assert (job.status, job.retry_count) == (Status.PENDING, 1)


@pytest.mark.django_db
def test_a_failure_report_without_a_usable_id_touches_nothing(task: ArchiveTask, caplog) -> None:
    row = claimed_archive_row()
    task.on_failure(OSError("x"), "t", (), {"verbose": True, "claim_token": MINE}, None)
    task.on_failure(OSError("x"), "t", (True,), {"claim_token": MINE}, None)
    row.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.IN_PROGRESS, 0)
    assert any("without an operation id" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_a_failure_report_without_a_claim_token_is_left_to_lease_recovery(
    task: ArchiveTask, caplog
) -> None:
    row = claimed_archive_row()
    report(task, OSError("x"), row.pk, token=None)
    row.refresh_from_db()
    assert (row.status, row.retry_count, row.claim_token) == (Status.IN_PROGRESS, 0, MINE)
    assert events(row) == []
    assert any("without a claim token" in r.getMessage() for r in caplog.records)


# --- late reports never clobber a newer claim ----------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("status", [Status.SCHEDULED, Status.IN_PROGRESS])
@pytest.mark.parametrize("exc", [OSError("late"), NonRetryableError("late and permanent")])
def test_a_late_failure_report_leaves_a_newer_claim_alone(
    task: ArchiveTask, status: str, exc: Exception
) -> None:
    # This run's lease expired, the row was recovered and claimed again (scheduled under the
    # manager's new claim, or in progress under the new worker): this run's late failure must not
    # reset or fail the newer claim, burn a retry, or fail the package. Both claims are made by
    # threads of the same process, so only the token can tell them apart.
    row = claimed_archive_row(
        status=status, claim_token="token-of-the-newer-claim", retry_count=1, max_retries=1
    )

    report(task, exc, row.pk, token=MINE)

    row.refresh_from_db()
    assert (row.status, row.retry_count, row.claim_token) == (
        status,
        1,
        "token-of-the-newer-claim",
    )
    assert row.failure_error_message == ""
    assert events(row) == []
    row.raw_data_package.refresh_from_db()
    assert row.raw_data_package.state == PackageState.WAITING


# --- unpacking, the second phase of a transfer ---------------------------------------------------
@pytest.mark.django_db
def test_an_unpack_failure_is_recorded_on_the_unpack_phase() -> None:
    transfer = f.DataTransferFactory(
        status=Status.COMPLETED, unpack_status=Status.IN_PROGRESS, claim_token=MINE
    )
    report(UnpackTask(), OSError("tar: unexpected EOF"), transfer.pk)
    transfer.refresh_from_db()
    assert (transfer.status, transfer.unpack_status) == (Status.COMPLETED, Status.PENDING)
    assert (transfer.unpack_retry_count, transfer.retry_count) == (1, 0)
    assert "unexpected EOF" in transfer.unpack_error_message
    assert transfer.failure_error_message == ""
    [event] = events(transfer, field="unpack_status")
    assert (event.from_state, event.to_state) == (Status.IN_PROGRESS, Status.PENDING)


@pytest.mark.django_db
def test_an_unpack_failure_with_no_retries_left_fails_the_unpacking_and_its_packages() -> None:
    transfer = f.DataTransferFactory(
        status=Status.COMPLETED,
        unpack_status=Status.IN_PROGRESS,
        claim_token=MINE,
        unpack_retry_count=3,
        max_retries=3,
    )
    package = f.RawDataPackageFactory(
        data_transfer_package=transfer.data_transfer_package, state=PackageState.TRANSFERRING
    )
    report(UnpackTask(), ChecksumMismatch("file 3 differs"), transfer.pk)
    transfer.refresh_from_db()
    package.refresh_from_db()
    assert (transfer.status, transfer.unpack_status) == (Status.COMPLETED, Status.FAILED)
    assert "gave up after 3 retries" in transfer.unpack_error_message
    assert package.state == PackageState.FAILED
