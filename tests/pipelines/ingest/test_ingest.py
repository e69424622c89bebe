"""The ingest service: scans start and finish, raw files are registered, verified and idempotent."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import xxhash

from pipelines.exceptions import IngestError
from pipelines.models import (
    DataLocation,
    ExecutedObsUnit,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
    StateEvent,
)
from pipelines.services.ingest import (
    executed_obs_unit_finish,
    executed_obs_unit_start,
    raw_data_file_register,
    raw_data_files_register_bulk,
)
from tests import factories as f
from tests.pipelines.ingest.conftest import T0

pytestmark = pytest.mark.django_db

ObsStatus = ExecutedObsUnit.ObsStatus


def _counts() -> dict[str, int]:
    return {
        "files": RawDataFile.objects.count(),
        "copies": PhysicalCopy.objects.count(),
        "events": StateEvent.objects.count(),
        "scans": ExecutedObsUnit.objects.count(),
    }


def _write(location: DataLocation, relative: str, data: bytes) -> None:
    path = Path(location.root_path) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _file_kwargs(
    scan: ExecutedObsUnit,
    module: Any,
    source: DataLocation,
    relative: str = "20250301/scan1/lfa/lfa_0001.fits",
    data: bytes = b"spectrum bytes " * 100,
    *,
    write: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    if write:
        _write(source, relative, data)
    kwargs: dict[str, Any] = {
        "id": uuid.uuid4(),
        "executed_obs_unit": scan,
        "instrument_module": module,
        "source_location": source,
        "relative_path": relative,
        "size": len(data),
        "checksum": hashlib.sha256(data).hexdigest(),
        "checksum_algorithm": "sha256",
        "file_type": "fits",
    }
    kwargs.update(overrides)
    return kwargs


# --- Executed obs units ---------------------------------------------------------------------------
def test_start_creates_a_running_scan_with_its_creation_event() -> None:
    obs_unit = f.ObsUnitFactory()
    config = f.InstrumentModuleConfigurationFactory()
    scan_id = uuid.uuid4()

    scan, created = executed_obs_unit_start(
        obs_unit=obs_unit,
        start_time=T0,
        id=scan_id,
        metadata={"observer": "night shift"},
        conditions={"pwv_mm": 0.6},
        instrument_module_configurations=[config],
        actor="api:telescope",
    )

    assert created is True
    scan.refresh_from_db()
    assert scan.pk == scan_id
    assert scan.status == ObsStatus.RUNNING
    assert scan.start_time == T0
    assert scan.end_time is None
    assert scan.metadata == {"observer": "night shift"}
    assert scan.conditions == {"pwv_mm": 0.6}
    assert list(scan.instrument_module_configurations.all()) == [config]
    event = StateEvent.objects.for_object(scan).get()
    assert (event.from_state, event.to_state, event.actor) == ("", "running", "api:telescope")


def test_start_without_an_id_generates_one() -> None:
    scan, created = executed_obs_unit_start(
        obs_unit=f.ObsUnitFactory(), start_time=T0, actor="test"
    )

    assert created is True
    assert isinstance(scan.pk, uuid.UUID)


def test_repeated_start_returns_the_existing_scan() -> None:
    obs_unit = f.ObsUnitFactory()
    scan_id = uuid.uuid4()
    first, _ = executed_obs_unit_start(obs_unit=obs_unit, start_time=T0, id=scan_id, actor="a")
    before = _counts()

    again, created = executed_obs_unit_start(
        obs_unit=obs_unit, start_time=T0, id=str(scan_id), actor="a"
    )

    assert created is False
    assert again.pk == first.pk
    assert _counts() == before


def test_start_with_a_known_id_for_another_obs_unit_is_refused() -> None:
    scan_id = uuid.uuid4()
    executed_obs_unit_start(obs_unit=f.ObsUnitFactory(), start_time=T0, id=scan_id, actor="a")
    before = _counts()

    with pytest.raises(IngestError, match="already registered for obs unit"):
        executed_obs_unit_start(obs_unit=f.ObsUnitFactory(), start_time=T0, id=scan_id, actor="a")
    assert _counts() == before


def test_start_with_a_known_id_and_another_start_time_is_refused() -> None:
    obs_unit = f.ObsUnitFactory()
    scan_id = uuid.uuid4()
    executed_obs_unit_start(obs_unit=obs_unit, start_time=T0, id=scan_id, actor="a")

    with pytest.raises(IngestError, match="already registered with start time"):
        executed_obs_unit_start(
            obs_unit=obs_unit, start_time=T0 + timedelta(seconds=1), id=scan_id, actor="a"
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"id": "not-a-uuid"}, "is not a UUID"),
        ({"start_time": datetime(2025, 3, 1, 4, 0)}, "has no time zone"),
    ],
)
def test_start_rejects_bad_input_and_writes_nothing(kwargs: dict[str, Any], message: str) -> None:
    obs_unit = f.ObsUnitFactory()
    before = _counts()

    with pytest.raises(IngestError, match=message):
        executed_obs_unit_start(**{"obs_unit": obs_unit, "start_time": T0, "actor": "a", **kwargs})
    assert _counts() == before


@pytest.mark.parametrize("status", [ObsStatus.COMPLETED, ObsStatus.FAILED, ObsStatus.ABORTED])
def test_finish_moves_a_running_scan_to_its_final_status(
    scan: ExecutedObsUnit, status: str
) -> None:
    scan.conditions = {"pwv_mm": 0.5}
    scan.save()
    end = T0 + timedelta(minutes=20)

    finished = executed_obs_unit_finish(
        scan, end_time=end, status=status, conditions={"elevation_deg": 55.0}, actor="api"
    )

    finished.refresh_from_db()
    assert finished.status == status
    assert finished.end_time == end
    assert finished.conditions == {"pwv_mm": 0.5, "elevation_deg": 55.0}
    event = StateEvent.objects.for_object(scan).get()
    assert (event.from_state, event.to_state) == ("running", status)


def test_repeating_the_same_finish_is_a_no_op(scan: ExecutedObsUnit) -> None:
    end = T0 + timedelta(minutes=20)
    executed_obs_unit_finish(scan, end_time=end, actor="api")
    before = _counts()

    again = executed_obs_unit_finish(scan, end_time=end, status="completed", actor="api")

    assert again.status == ObsStatus.COMPLETED
    assert again.end_time == end
    assert _counts() == before


def test_a_stale_instance_is_refreshed_before_finishing(scan: ExecutedObsUnit) -> None:
    end = T0 + timedelta(minutes=20)
    stale = ExecutedObsUnit.objects.get(pk=scan.pk)
    executed_obs_unit_finish(scan, end_time=end, actor="api")

    again = executed_obs_unit_finish(stale, end_time=end, actor="api")

    assert again.status == ObsStatus.COMPLETED


def test_finishing_a_finished_scan_differently_is_refused(scan: ExecutedObsUnit) -> None:
    end = T0 + timedelta(minutes=20)
    executed_obs_unit_finish(scan, end_time=end, actor="api")
    before = _counts()

    with pytest.raises(IngestError, match="already finished as 'completed'"):
        executed_obs_unit_finish(scan, end_time=end, status="aborted", actor="api")
    with pytest.raises(IngestError, match="already finished"):
        executed_obs_unit_finish(scan, end_time=end + timedelta(seconds=1), actor="api")
    scan.refresh_from_db()
    assert scan.status == ObsStatus.COMPLETED
    assert _counts() == before


def test_finish_before_start_is_refused(scan: ExecutedObsUnit) -> None:
    with pytest.raises(IngestError, match="before the scan's start_time"):
        executed_obs_unit_finish(scan, end_time=T0 - timedelta(seconds=1), actor="api")
    scan.refresh_from_db()
    assert scan.status == ObsStatus.RUNNING
    assert scan.end_time is None


@pytest.mark.parametrize("status", ["running", "done", ""])
def test_finish_with_a_non_final_status_is_refused(scan: ExecutedObsUnit, status: str) -> None:
    with pytest.raises(IngestError, match="is not one of: completed, failed, aborted"):
        executed_obs_unit_finish(scan, end_time=T0, status=status, actor="api")
    scan.refresh_from_db()
    assert scan.status == ObsStatus.RUNNING


# --- Raw data files -------------------------------------------------------------------------------
def test_register_creates_the_file_a_verified_copy_and_an_event(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    data = b"\x00\x01 lfa spectrum " * 1000
    kwargs = _file_kwargs(scan, module, source, data=data, metadata={"subscan": 1})

    raw, created = raw_data_file_register(**kwargs, actor="api:chai")

    assert created is True
    raw.refresh_from_db()
    assert raw.pk == kwargs["id"]
    assert raw.name == "lfa_0001.fits"
    assert raw.relative_path == "20250301/scan1/lfa/lfa_0001.fits"
    assert raw.size == len(data)
    assert raw.checksum == hashlib.sha256(data).hexdigest()
    assert raw.metadata == {"subscan": 1}
    assert raw.raw_data_package is None
    copy = PhysicalCopy.objects.get(raw_data_file=raw)
    assert copy.kind == PhysicalCopy.Kind.RAW_DATA_FILE
    assert copy.location == source
    assert copy.relative_path == raw.relative_path
    assert copy.status == PhysicalCopyStatus.PRESENT
    assert copy.integrity == PhysicalCopy.Integrity.VERIFIED
    assert copy.verified_checksum == raw.checksum
    assert copy.checksum_verified_at is not None
    event = StateEvent.objects.for_object(copy).get()
    assert (event.to_state, event.actor) == ("present", "api:chai")
    assert "verified" in event.reason


def test_register_with_xxh3_and_an_uppercase_checksum(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    data = b"camera timestream" * 50
    kwargs = _file_kwargs(
        scan,
        module,
        source,
        data=data,
        checksum=xxhash.xxh3_128(data).hexdigest().upper(),
        checksum_algorithm="xxh3_128",
    )

    raw, _ = raw_data_file_register(**kwargs, actor="api")

    assert raw.checksum == xxhash.xxh3_128(data).hexdigest()
    assert raw.checksum_algorithm == "xxh3_128"
    assert raw.physical_copies.get().integrity == PhysicalCopy.Integrity.VERIFIED


def test_an_empty_file_can_be_registered(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    raw, created = raw_data_file_register(
        **_file_kwargs(scan, module, source, "empty.log", data=b""), actor="api"
    )

    assert created is True
    assert raw.size == 0


def test_verify_false_records_an_unverified_copy_without_reading(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source, write=False, verify=False)

    raw, created = raw_data_file_register(**kwargs, actor="api")

    assert created is True
    copy = raw.physical_copies.get()
    assert copy.integrity == PhysicalCopy.Integrity.UNVERIFIED
    assert copy.verified_checksum == ""
    assert copy.checksum_verified_at is None


def test_a_location_on_another_host_is_not_verified_here(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    source.host = "chai-computer.ccat.invalid"
    source.save()
    kwargs = _file_kwargs(scan, module, source, write=False)

    raw, _ = raw_data_file_register(**kwargs, actor="api")

    assert raw.physical_copies.get().integrity == PhysicalCopy.Integrity.UNVERIFIED


def test_a_local_root_that_is_not_mounted_here_is_not_verified(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, tmp_path: Path
) -> None:
    source.root_path = str(tmp_path / "not-mounted")
    source.save()
    kwargs = _file_kwargs(scan, module, source, write=False)

    raw, _ = raw_data_file_register(**kwargs, actor="api")

    assert raw.physical_copies.get().integrity == PhysicalCopy.Integrity.UNVERIFIED


def _assert_rejected(kwargs: dict[str, Any], message: str) -> None:
    before = _counts()
    with pytest.raises(IngestError, match=message):
        raw_data_file_register(**kwargs, actor="api")
    assert _counts() == before


def test_unavailable_instrument_is_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    module.instrument.available = False
    module.instrument.save()

    _assert_rejected(_file_kwargs(scan, module, source), "is not available")


@pytest.mark.parametrize(
    "location_type",
    [
        DataLocation.LocationType.BUFFER,
        DataLocation.LocationType.LONG_TERM_ARCHIVE,
        DataLocation.LocationType.PROCESSING,
    ],
)
def test_a_location_that_is_not_a_source_is_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, location_type: str
) -> None:
    source.location_type = location_type
    source.save()

    _assert_rejected(_file_kwargs(scan, module, source), "registered at a SOURCE location")


def test_an_inactive_location_is_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    source.active = False
    source.save()

    _assert_rejected(_file_kwargs(scan, module, source), "is not active")


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("../outside.fits", r"contains '\.\.'"),
        ("/etc/passwd", "is absolute"),
        ("a/\x00b", "NUL byte"),
        ("", "empty"),
    ],
)
def test_an_unsafe_relative_path_is_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, relative: str, message: str
) -> None:
    kwargs = _file_kwargs(scan, module, source, write=False, relative_path=relative)

    _assert_rejected(kwargs, f"relative_path rejected: .*{message}")


def test_a_path_through_a_symlink_out_of_the_root_is_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    data = b"not ours"
    (outside / "x.fits").write_bytes(data)
    (Path(source.root_path) / "link").symlink_to(outside)
    kwargs = _file_kwargs(scan, module, source, "link/x.fits", data, write=False)

    _assert_rejected(kwargs, "outside the location root")


def test_a_negative_size_is_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    _assert_rejected(_file_kwargs(scan, module, source, size=-1), "size must not be negative")


@pytest.mark.parametrize(
    ("checksum", "algorithm", "message"),
    [
        ("abc123", "sha256", "is not a 64-character hex digest"),
        ("z" * 64, "sha256", "is not a 64-character hex digest"),
        (hashlib.sha256(b"x").hexdigest(), "xxh3_128", "is not a 32-character hex digest"),
        (hashlib.sha256(b"x").hexdigest(), "md5", "unknown checksum algorithm 'md5'"),
    ],
)
def test_a_malformed_checksum_or_unknown_algorithm_is_rejected(
    scan: ExecutedObsUnit,
    module: Any,
    source: DataLocation,
    checksum: str,
    algorithm: str,
    message: str,
) -> None:
    kwargs = _file_kwargs(scan, module, source, checksum=checksum, checksum_algorithm=algorithm)

    _assert_rejected(kwargs, message)


def test_files_of_a_failed_scan_are_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    executed_obs_unit_finish(scan, end_time=T0, status="failed", actor="api")

    _assert_rejected(_file_kwargs(scan, module, source), "is failed; files are accepted only")


@pytest.mark.parametrize("status", ["completed", "aborted"])
def test_files_arriving_after_the_finish_are_accepted(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, status: str
) -> None:
    executed_obs_unit_finish(scan, end_time=T0, status=status, actor="api")

    _, created = raw_data_file_register(**_file_kwargs(scan, module, source), actor="api")

    assert created is True


def test_a_missing_file_is_rejected(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    _assert_rejected(
        _file_kwargs(scan, module, source, write=False), "does not exist at the source location"
    )


def test_a_directory_is_not_a_file(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    (Path(source.root_path) / "adir").mkdir()

    _assert_rejected(
        _file_kwargs(scan, module, source, "adir", b"", write=False), "is not a regular file"
    )


def test_a_size_mismatch_names_expected_and_actual(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source, data=b"12345")
    kwargs["size"] = 6

    _assert_rejected(kwargs, "size mismatch .*: expected 6 bytes, found 5")


def test_a_corrupted_byte_is_detected_at_ingest(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    data = b"A" * 4096
    kwargs = _file_kwargs(scan, module, source, data=data)
    corrupted = b"A" * 2000 + b"B" + b"A" * 2095
    _write(source, kwargs["relative_path"], corrupted)

    _assert_rejected(
        kwargs,
        f"checksum mismatch .*expected sha256 {hashlib.sha256(data).hexdigest()}, "
        f"actual {hashlib.sha256(corrupted).hexdigest()}",
    )


def test_repeating_a_registration_returns_the_existing_file(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source)
    first, _ = raw_data_file_register(**kwargs, actor="api")
    before = _counts()
    # The repeat does not read the disk again: the file may already have been packaged away.
    (Path(source.root_path) / kwargs["relative_path"]).unlink()

    again, created = raw_data_file_register(**{**kwargs, "id": str(kwargs["id"])}, actor="api")

    assert created is False
    assert again.pk == first.pk
    assert _counts() == before


def test_repeating_a_registration_with_other_data_is_refused(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source)
    raw_data_file_register(**kwargs, actor="api")

    _assert_rejected({**kwargs, "size": kwargs["size"] + 1}, "already registered with different")
    _assert_rejected({**kwargs, "file_type": "hdf5"}, r"file_type 'fits' != 'hdf5'")
    _assert_rejected({**kwargs, "checksum": "0" * 64}, "checksum")


def test_the_same_path_under_another_id_is_refused(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source)
    first, _ = raw_data_file_register(**kwargs, actor="api")

    _assert_rejected(
        {**kwargs, "id": uuid.uuid4(), "relative_path": "./" + kwargs["relative_path"]},
        f"already registered as raw data file {first.pk}",
    )


def test_the_same_path_at_another_source_location_is_a_different_file(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, tmp_path: Path
) -> None:
    other_root = tmp_path / "ccat" / "primecam_raw_data"
    other_root.mkdir(parents=True)
    other = f.DataLocationFactory(
        name="primecam_raw_data",
        site=source.site,
        location_type=DataLocation.LocationType.SOURCE,
        root_path=str(other_root),
    )
    raw_data_file_register(**_file_kwargs(scan, module, source, "same.fits"), actor="api")

    _, created = raw_data_file_register(
        **_file_kwargs(scan, module, other, "same.fits"), actor="api"
    )

    assert created is True


# --- Bulk -----------------------------------------------------------------------------------------
def test_bulk_registers_every_item_in_order(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    items = [
        _file_kwargs(scan, module, source, f"bulk/lfa_{n:04d}.fits", bytes([n]) * (100 + n))
        for n in range(5)
    ]

    results = raw_data_files_register_bulk(items, actor="api")

    assert [raw.pk for raw, _ in results] == [item["id"] for item in items]
    assert all(created for _, created in results)
    assert RawDataFile.objects.count() == 5
    assert PhysicalCopy.objects.filter(integrity=PhysicalCopy.Integrity.VERIFIED).count() == 5


def test_bulk_with_one_bad_item_writes_nothing_and_names_the_index(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    items = [
        _file_kwargs(scan, module, source, f"bulk/lfa_{n:04d}.fits", bytes([n]) * 64)
        for n in range(4)
    ]
    items[2]["checksum"] = "0" * 64
    before = _counts()

    with pytest.raises(IngestError, match=r"^item 2: checksum mismatch"):
        raw_data_files_register_bulk(items, actor="api")
    assert _counts() == before


def test_bulk_duplicate_path_inside_the_batch_rolls_back_everything(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    first = _file_kwargs(scan, module, source, "bulk/a.fits", b"a" * 10)
    second = _file_kwargs(scan, module, source, "bulk/b.fits", b"b" * 10)
    clash = {**first, "id": uuid.uuid4()}
    before = _counts()

    with pytest.raises(IngestError, match=r"^item 2: .*already registered as raw data file"):
        raw_data_files_register_bulk([first, second, clash], actor="api")
    assert _counts() == before


def test_bulk_rejects_unknown_keys_and_non_objects_with_the_index(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    good = _file_kwargs(scan, module, source)
    before = _counts()

    with pytest.raises(IngestError, match=r"^item 1: unknown fields: colour$"):
        raw_data_files_register_bulk([good, {**good, "colour": "red"}], actor="api")
    incomplete = {k: v for k, v in good.items() if k not in ("size", "checksum")}
    with pytest.raises(IngestError, match=r"^item 1: missing fields: checksum, size$"):
        raw_data_files_register_bulk([good, incomplete], actor="api")
    with pytest.raises(IngestError, match=r"^item 0: unknown fields: actor$"):
        raw_data_files_register_bulk([{**good, "actor": "me"}], actor="api")
    with pytest.raises(IngestError, match=r"^item 1: expected an object, got list"):
        raw_data_files_register_bulk([good, []], actor="api")  # type: ignore[list-item]
    assert _counts() == before


def test_bulk_repeat_is_idempotent_and_reports_what_existed(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    items = [
        _file_kwargs(scan, module, source, f"bulk/{n}.fits", bytes([n]) * 32) for n in range(3)
    ]
    raw_data_files_register_bulk(items[:2], actor="api")
    before = _counts()

    results = raw_data_files_register_bulk(items, actor="api")

    assert [created for _, created in results] == [False, False, True]
    assert RawDataFile.objects.count() == before["files"] + 1


def test_bulk_with_the_same_item_twice_creates_it_once(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    item = _file_kwargs(scan, module, source)

    results = raw_data_files_register_bulk([item, dict(item)], actor="api")

    assert [created for _, created in results] == [True, False]
    assert results[0][0].pk == results[1][0].pk
    assert RawDataFile.objects.count() == 1


def test_a_concurrent_identical_registration_returns_the_winners_file(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two deliveries of one client request race: both pass validation, the other one inserts
    # first. The loser gets the idempotent answer, as a sequential repeat would, not an error.
    from pipelines.services import ingest

    kwargs = _file_kwargs(scan, module, source)
    real_check = ingest._check_path_free
    calls = {"n": 0}

    def other_request_wins(values: dict[str, Any]) -> None:
        calls["n"] += 1
        real_check(values)
        if calls["n"] == 2:  # in _write_file, after its own "already there?" check
            monkeypatch.setattr(ingest, "_check_path_free", real_check)
            raw_data_file_register(**kwargs, actor="other-delivery")

    monkeypatch.setattr(ingest, "_check_path_free", other_request_wins)

    raw_file, created = raw_data_file_register(**kwargs, actor="api")

    assert created is False
    assert raw_file.pk == kwargs["id"]
    assert RawDataFile.objects.count() == 1
    assert PhysicalCopy.objects.filter(raw_data_file=raw_file).count() == 1
