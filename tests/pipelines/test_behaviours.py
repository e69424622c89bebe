"""Acceptance tests named after the testable behaviours of the ops-db brief
(``reference/ccat-opsdb-transfer.md`` §8). Each test drives the real entry point (the model and
database, the ingest service, the task base class, lease recovery, queue discovery) and asserts
on the database. Behaviours 6-10 and 32 are in ``test_packaging.py`` and ``test_heartbeats.py``.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, models, transaction
from django.utils import timezone

from pipelines import queues
from pipelines.exceptions import (
    ChecksumMismatch,
    IngestError,
    NonRetryableError,
    StorageUnavailable,
    UnsafePath,
)
from pipelines.models import (
    DataLocation,
    DataTransfer,
    ExecutedObsUnit,
    LongTermArchiveTransfer,
    ObsUnit,
    Operation,
    PackageState,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
    RawDataPackage,
    Site,
    Source,
    Status,
)
from pipelines.services.ingest import raw_data_file_register, raw_data_files_register_bulk
from pipelines.services.operations import operation_claim_batch, operation_start
from pipelines.services.recovery import recover_expired_leases
from pipelines.tasks import OperationTask, build_raw_data_package
from tests import factories as f

pytestmark = pytest.mark.django_db

LT = DataLocation.LocationType
T0 = datetime(2025, 3, 1, 4, 0, tzinfo=UTC)


def _refused(write: Any) -> None:
    """``write`` is refused by the database (in a savepoint, so the test can go on)."""
    with pytest.raises(IntegrityError), transaction.atomic():
        write()


# --- 1-5: observatory model and ingest --------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "parent", "build"),
    [
        (ExecutedObsUnit, "obs_unit", lambda: {"start_time": T0}),
        (ObsUnit, "observing_program", lambda: {"name": f"unit-{uuid.uuid4()}"}),
    ],
    ids=["executed_obs_unit", "obs_unit"],
)
def test_behaviour_1_a_scan_needs_an_existing_obs_unit_and_an_obs_unit_a_programme(
    model: type[models.Model], parent: str, build: Any
) -> None:
    with pytest.raises(ValidationError) as excinfo:
        model(**build()).full_clean()
    assert parent in excinfo.value.message_dict
    _refused(lambda: model.objects.create(**build(), **{f"{parent}_id": None}))

    def dangling() -> None:
        model.objects.create(**build(), **{f"{parent}_id": 10**9})
        connection.check_constraints(table_names=[model._meta.db_table])

    _refused(dangling)
    assert not model.objects.exists()


def test_behaviour_1_the_sub_observing_program_is_optional() -> None:
    unit = f.ObsUnitFactory(sub_observing_program=None)
    unit.full_clean()
    scan = f.ExecutedObsUnitFactory(obs_unit=unit)
    assert ExecutedObsUnit.objects.get(pk=scan.pk).obs_unit.sub_observing_program is None


def test_behaviour_2_source_holds_the_three_kinds_and_one_query_returns_them_all() -> None:
    kinds = {
        Source.SourceType.FIXED: {"ra_deg": 83.82, "dec_deg": -5.39},
        Source.SourceType.SOLAR_SYSTEM: {"ephemeris_name": "Jupiter"},
        Source.SourceType.CONSTANT_ELEVATION: {"elevation_deg": 45.0, "az_min_deg": 10.0},
    }
    # The ops-db subtypes FixedSource, SolarSystemObject, ConstantElevationSource are the kinds
    # of one table; there is no fourth.
    assert set(Source.SourceType.values) == {"fixed", "solar_system", "constant_elevation"}
    for kind, columns in kinds.items():
        Source.objects.create(name=f"src-{kind}", source_type=kind, **columns)
        # A row of that kind without the columns the kind needs is refused.
        _refused(lambda kind=kind: Source.objects.create(name=f"bare-{kind}", source_type=kind))
    _refused(lambda: Source.objects.create(name="comet", source_type="comet"))

    assert sorted(Source.objects.values_list("source_type", flat=True)) == sorted(kinds)


@pytest.fixture
def source(tmp_path: Path) -> DataLocation:
    root = tmp_path / "chai_raw_data"
    root.mkdir()
    return f.DataLocationFactory(name="chai_raw", location_type=LT.SOURCE, root_path=str(root))


def _registration(source: DataLocation, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``raw_data_file_register`` for a file written below the root."""
    data = b"spectrum " * 64
    relative = overrides.pop("relative_path", f"20250301/{uuid.uuid4().hex}.fits")
    path = Path(source.root_path) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    kwargs: dict[str, Any] = {
        "executed_obs_unit": overrides.pop("executed_obs_unit", None) or f.ExecutedObsUnitFactory(),
        "instrument_module": overrides.pop("instrument_module", None)
        or f.InstrumentModuleFactory(),
        "source_location": source,
        "relative_path": relative,
        "size": len(data),
        "checksum": hashlib.sha256(data).hexdigest(),
    }
    return {**kwargs, **overrides}


def test_behaviour_3_ingest_for_a_module_of_an_unavailable_instrument_is_rejected(
    source: DataLocation,
) -> None:
    module = f.InstrumentModuleFactory(instrument__available=False)
    item = _registration(source, instrument_module=module)

    with pytest.raises(IngestError, match="not available"):
        raw_data_file_register(**item, actor="test")
    with pytest.raises(IngestError, match=r"item 0: .*not available"):
        raw_data_files_register_bulk([item], actor="test")
    assert not RawDataFile.objects.exists()
    assert not PhysicalCopy.objects.exists()

    module.instrument.available = True
    module.instrument.save()
    raw_file, created = raw_data_file_register(**item, actor="test")
    assert created and raw_file.instrument_module == module


def test_behaviour_4_a_client_uuid_is_the_primary_key_and_reposting_it_creates_no_duplicate(
    source: DataLocation,
) -> None:
    assert isinstance(RawDataFile._meta.pk, models.UUIDField)
    client_id = uuid.uuid4()  # generated offline, before the database saw the file
    item = _registration(source, id=str(client_id))

    first, created = raw_data_file_register(**item, actor="test")
    again, created_again = raw_data_file_register(**item, actor="test")
    [(bulk, created_bulk)] = raw_data_files_register_bulk([item], actor="test")

    assert first.pk == client_id
    assert (created, created_again, created_bulk) == (True, False, False)
    assert again.pk == bulk.pk == client_id
    assert RawDataFile.objects.count() == 1
    assert PhysicalCopy.objects.filter(raw_data_file_id=client_id).count() == 1


@pytest.mark.parametrize("parent", ["instrument_module", "executed_obs_unit"])
def test_behaviour_5_every_raw_file_has_exactly_one_module_and_one_scan(
    source: DataLocation, parent: str
) -> None:
    field = RawDataFile._meta.get_field(parent)
    assert field.many_to_one and not field.null  # one, never several, never none

    raw_file, _ = raw_data_file_register(**_registration(source), actor="test")
    assert getattr(raw_file, f"{parent}_id") is not None
    _refused(lambda: RawDataFile.objects.filter(pk=raw_file.pk).update(**{f"{parent}_id": None}))


# --- 12-13: enums and their check constraints ----------------------------------------------------
OPERATION_FACTORIES = {
    "raw_data_package": f.RawDataPackageFactory,
    "data_transfer_package": f.DataTransferPackageFactory,
    "data_transfer": f.DataTransferFactory,
    "long_term_archive_transfer": f.LongTermArchiveTransferFactory,
    "staging_job": f.StagingJobFactory,
    "deletion_task": f.DeletionTaskFactory,
}


@pytest.mark.parametrize("table", OPERATION_FACTORIES)
def test_behaviour_12_status_is_exactly_the_five_values_and_the_database_refuses_others(
    table: str,
) -> None:
    assert Status.values == ["pending", "scheduled", "in_progress", "completed", "failed"]
    row = OPERATION_FACTORIES[table]()
    rows = type(row)._default_manager.filter(pk=row.pk)
    for value in Status.values:
        assert rows.update(status=value) == 1
    for bogus in ("cancelled", "PENDING", ""):
        _refused(lambda bogus=bogus: rows.update(status=bogus))
    row.refresh_from_db()
    assert row.status == Status.FAILED


def test_behaviour_13_physical_copy_status_is_exactly_the_seven_values_and_no_other() -> None:
    names = {"PRESENT", "STAGED", "DELETED", "DELETION_FAILED", "DELETION_POSSIBLE"}
    names |= {"DELETION_SCHEDULED", "DELETION_IN_PROGRESS"}
    assert set(PhysicalCopyStatus.names) == names
    assert set(PhysicalCopyStatus.values) == {name.lower() for name in names}

    for value in PhysicalCopyStatus.values:
        copy = f.PhysicalCopyFactory(status=value)
        assert PhysicalCopy.objects.get(pk=copy.pk).status == value
    _refused(lambda: f.PhysicalCopyFactory(status="archived"))
    copy = f.PhysicalCopyFactory()
    copy.status = "lost"
    _refused(copy.save)
    assert PhysicalCopy.objects.get(pk=copy.pk).status == PhysicalCopyStatus.PRESENT


# --- 26-27: queues -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("site", "location", "location_type", "operation", "expected"),
    [
        ("cologne", "buffer", LT.BUFFER, "deletion", "cologne_buffer_deletion"),
        ("ccat", "chai_raw", LT.SOURCE, "raw_data_package_creation", None),
        ("cologne", "lta", LT.LONG_TERM_ARCHIVE, "long_term_archive_transfer", None),
    ],
)
def test_behaviour_26_queue_names_are_site_location_operation(
    site: str, location: str, location_type: str, operation: str, expected: str | None
) -> None:
    row = f.DataLocationFactory(
        site=f.SiteFactory(short_name=site), name=location, location_type=location_type
    )
    name = queues.queue_name(row, operation)
    assert name == (expected or f"{site}_{location}_{operation}")
    assert name in queues.discover_queues(site=site)


def test_behaviour_27_a_new_site_and_location_bring_their_queues_into_discovery() -> None:
    f.DataLocationFactory(site=f.SiteFactory(short_name="cologne"), name="buffer")
    before = queues.discover_queues()
    assert not [q for q in before if q.startswith("bonn_")]

    # Plain rows, as an operator adds them in the admin: no code, no settings.
    bonn = Site.objects.create(name="Bonn", short_name="bonn")
    DataLocation.objects.create(
        site=bonn, name="archive", location_type=LT.LONG_TERM_ARCHIVE, root_path="/srv/a"
    )

    added = set(queues.discover_queues()) - set(before)
    assert added == {
        "bonn_archive_long_term_archive_transfer",
        "bonn_archive_data_transfer",
        "bonn_archive_data_transfer_unpacking",
        "bonn_archive_deletion",
        "bonn_archive_integrity_check",
    }
    assert queues.discover_queues(site="bonn") == sorted(added)


# --- 28-31: failures, retries and dead workers ---------------------------------------------------
class ArchiveTransferTask(OperationTask):
    name = "tests.behaviours.archive_transfer"
    operation_model = LongTermArchiveTransfer


class DataTransferTask(OperationTask):
    name = "tests.behaviours.data_transfer"
    operation_model = DataTransfer


def _package_build() -> tuple[OperationTask, Operation, RawDataPackage]:
    package = f.RawDataPackageFactory()
    return build_raw_data_package, package, package


def _archive_transfer() -> tuple[OperationTask, Operation, RawDataPackage]:
    row = f.LongTermArchiveTransferFactory(raw_data_package__state=PackageState.TRANSFERRING)
    return ArchiveTransferTask(), row, row.raw_data_package


def _data_transfer() -> tuple[OperationTask, Operation, RawDataPackage]:
    row = f.DataTransferFactory()
    package = f.RawDataPackageFactory(
        state=PackageState.TRANSFERRING, data_transfer_package=row.data_transfer_package
    )
    return DataTransferTask(), row, package


PACKAGE_OPERATIONS = {
    "build_raw_data_package": _package_build,
    "long_term_archive_transfer": _archive_transfer,
    "data_transfer": _data_transfer,
}


def _claim_and_start(row: Operation) -> str:
    """A manager's claim and a worker's start: the row is in_progress under a new token."""
    model = type(row)
    claim = operation_claim_batch(
        model, owner="manager", limit=1, queryset=model.objects.due().filter(pk=row.pk)
    )
    assert claim.ids == [row.pk]
    operation_start(row, token=claim.token, owner="worker-1")
    return claim.token


def _report(task: OperationTask, row: Operation, exc: BaseException, token: str) -> None:
    """What Celery calls when the worker task raised."""
    task.on_failure(exc, "celery-task-id", (row.pk,), {"claim_token": token}, None)


@pytest.mark.parametrize(
    "exc",
    [OSError(5, "Input/output error"), StorageUnavailable("mount gone"), ChecksumMismatch("x")],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("operation", PACKAGE_OPERATIONS)
def test_behaviour_28_a_retryable_failure_resets_the_row_to_pending_with_one_more_retry(
    operation: str, exc: BaseException
) -> None:
    task, row, _ = PACKAGE_OPERATIONS[operation]()
    type(row)._default_manager.filter(pk=row.pk).update(retry_count=1)
    _report(task, row, exc, _claim_and_start(row))

    row.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.PENDING, 2)
    assert row.claim_token == "" and row.lease_expires_at is None
    assert row.failure_error_message.startswith(type(exc).__name__)


@pytest.mark.parametrize("operation", PACKAGE_OPERATIONS)
def test_behaviour_29_after_three_retries_the_row_and_package_fail_and_an_operator_is_alerted(
    operation: str, caplog: pytest.LogCaptureFixture
) -> None:
    task, row, package = PACKAGE_OPERATIONS[operation]()
    assert row.max_retries == 3

    with caplog.at_level(logging.ERROR, logger="pipelines.alerts"):
        for attempt in range(1, 5):
            _report(task, row, StorageUnavailable(f"attempt {attempt}"), _claim_and_start(row))
            row.refresh_from_db()
            package.refresh_from_db()
            if attempt <= 3:
                assert (row.status, row.retry_count) == (Status.PENDING, attempt)
                assert package.state != PackageState.FAILED
                assert not [r for r in caplog.records if r.name == "pipelines.alerts"]

    assert (row.status, row.retry_count) == (Status.FAILED, 3)
    assert "gave up after 3 retries" in row.failure_error_message
    assert package.state == PackageState.FAILED
    [alert] = [r for r in caplog.records if r.name == "pipelines.alerts"]
    assert alert.levelno == logging.ERROR and "failed permanently" in alert.getMessage()
    # A failed row is never claimed again by a manager.
    assert not type(row).objects.due().filter(pk=row.pk).exists()


@pytest.mark.parametrize(
    "exc",
    [NonRetryableError("no such location"), UnsafePath("../etc"), ValueError("a bug")],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("operation", PACKAGE_OPERATIONS)
def test_behaviour_30_a_non_retryable_error_fails_the_row_at_once_without_a_retry(
    operation: str, exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    task, row, package = PACKAGE_OPERATIONS[operation]()
    with caplog.at_level(logging.ERROR, logger="pipelines.alerts"):
        _report(task, row, exc, _claim_and_start(row))

    row.refresh_from_db()
    package.refresh_from_db()
    assert (row.status, row.retry_count) == (Status.FAILED, 0)
    assert package.state == PackageState.FAILED
    assert any(r.name == "pipelines.alerts" for r in caplog.records)


@pytest.mark.parametrize("lease", ["expired", "never_written"])
def test_behaviour_31_a_worker_that_died_mid_task_has_its_row_handed_back(lease: str) -> None:
    # Celery re-queues the message of a killed worker: acknowledged only after the task ran.
    assert build_raw_data_package.acks_late is True
    assert build_raw_data_package.reject_on_worker_lost is True

    package = f.RawDataPackageFactory()
    dead_token = _claim_and_start(package)
    rows = RawDataPackage.objects.filter(pk=package.pk)
    long_ago = timezone.now() - timedelta(days=1)
    if lease == "expired":
        rows.update(lease_expires_at=long_ago)
    else:
        rows.update(lease_expires_at=None, updated_at=long_ago)
    assert recover_expired_leases()["raw_data_package"] == 1

    package.refresh_from_db()
    assert (package.status, package.retry_count) == (Status.PENDING, 1)
    assert package.claim_token == ""
    assert RawDataPackage.objects.due().filter(pk=package.pk).exists()
    # The dead worker's late report (or a redelivery's) changes nothing.
    _report(build_raw_data_package, package, OSError("killed"), dead_token)
    package.refresh_from_db()
    assert (package.status, package.retry_count) == (Status.PENDING, 1)
