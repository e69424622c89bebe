"""Packaging: planning packages from the files of finished scans, building each tar on the core
(claim, start, complete with the buffer copy), and the manager tick that dispatches the builds.
Named after behaviours 6-10 of the ops-db brief (reference/ccat-opsdb-transfer.md §8)."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

import pytest

from pipelines.exceptions import StorageUnavailable, is_retryable
from pipelines.models import (
    DataLocation,
    ExecutedObsUnit,
    PackageState,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    Status,
)
from pipelines.services.operations import ClaimLost, operation_claim_batch
from pipelines.services.packaging import (
    SourceFileCorrupt,
    get_unpackaged_raw_data_files,
    package_buffer,
    packaging_manager_tick,
    raw_data_package_build,
    raw_data_packages_plan,
)
from pipelines.tasks import build_raw_data_package
from tests import factories as f

pytestmark = pytest.mark.django_db
LT = DataLocation.LocationType
Obs = ExecutedObsUnit.ObsStatus


class Facility:
    """One observatory site with a SOURCE and two buffers on disk under ``tmp_path``."""

    def __init__(self, root: Path) -> None:
        self.site = f.SiteFactory(short_name="obs")
        self.source = f.DataLocationFactory(
            site=self.site, name="instrument", location_type=LT.SOURCE, root_path=root / "src"
        )
        self.buffer = f.DataLocationFactory(
            site=self.site,
            name="buffer",
            location_type=LT.BUFFER,
            priority=10,
            root_path=root / "buffer",
        )
        self.spare = f.DataLocationFactory(
            site=self.site,
            name="spare",
            location_type=LT.BUFFER,
            priority=0,
            root_path=root / "spare",
        )
        self.module = f.InstrumentModuleFactory(name="chai_lfa")

    def scan(self, status: str = Obs.COMPLETED) -> ExecutedObsUnit:
        scan: ExecutedObsUnit = f.ExecutedObsUnitFactory(status=status)
        return scan

    def file(self, scan: ExecutedObsUnit, relative: str, data: bytes, module: Any = None) -> Any:
        path = Path(self.source.root_path) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f.RawDataFileFactory(
            name=path.name,
            relative_path=relative,
            size=len(data),
            checksum=hashlib.sha256(data).hexdigest(),
            executed_obs_unit=scan,
            instrument_module=module or self.module,
            source_location=self.source,
        )


@pytest.fixture
def facility(tmp_path: Path) -> Facility:
    return Facility(tmp_path)


def claim_and_build(package: RawDataPackage) -> RawDataPackage:
    claim = operation_claim_batch(
        RawDataPackage, owner="test", limit=1, queryset=RawDataPackage.objects.filter(pk=package.pk)
    )
    assert claim.ids == [package.pk]
    return raw_data_package_build(package.pk, token=claim.token, owner="worker")


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


# --- planning ------------------------------------------------------------------------------------
def test_behaviour_6_files_of_two_modules_in_one_scan_make_two_packages(facility: Facility) -> None:
    scan = facility.scan()
    other = f.InstrumentModuleFactory(name="chai_hfa")
    facility.file(scan, "chai/lfa/a.fits", b"a" * 10)
    facility.file(scan, "chai/hfa/b.fits", b"b" * 10, module=other)

    result = raw_data_packages_plan()

    assert (result.packages, result.files) == (2, 2)
    modules = set(RawDataPackage.objects.values_list("instrument_module__name", flat=True))
    assert modules == {"chai_lfa", "chai_hfa"}
    for package in RawDataPackage.objects.all():
        assert (package.status, package.state, package.file_count) == ("pending", "waiting", 1)


def test_behaviour_7_a_package_never_exceeds_the_maximum_size(facility: Facility) -> None:
    scan = facility.scan()
    for i in range(7):
        facility.file(scan, f"raw/{i:02d}.dat", bytes([i]) * 40)

    raw_data_packages_plan(max_bytes=100)

    packages = list(RawDataPackage.objects.order_by("name"))
    assert [p.file_count for p in packages] == [2, 2, 2, 1]
    assert all(p.size <= 100 for p in packages)
    # Reproducible split: files in path order.
    first = packages[0].files.order_by("relative_path").values_list("relative_path", flat=True)
    assert list(first) == ["raw/00.dat", "raw/01.dat"]
    assert len({p.name for p in packages}) == 4


def test_a_single_file_larger_than_the_maximum_gets_a_package_of_its_own(
    facility: Facility, caplog
) -> None:
    scan = facility.scan()
    facility.file(scan, "raw/big.dat", b"x" * 300)
    facility.file(scan, "raw/small.dat", b"y" * 10)
    raw_data_packages_plan(max_bytes=100)
    assert sorted(RawDataPackage.objects.values_list("file_count", flat=True)) == [1, 1]
    assert any("larger than RAW_DATA_PACKAGE_MAX_BYTES" in r.getMessage() for r in caplog.records)


def test_behaviour_9_a_packaged_file_is_not_picked_up_again(facility: Facility) -> None:
    scan = facility.scan()
    facility.file(scan, "raw/a.dat", b"a")
    assert get_unpackaged_raw_data_files().count() == 1
    raw_data_packages_plan()
    assert get_unpackaged_raw_data_files().count() == 0
    second = raw_data_packages_plan()
    assert (second.packages, second.files) == (0, 0)
    assert RawDataPackage.objects.count() == 1


def test_files_of_running_or_failed_scans_are_not_packaged(facility: Facility) -> None:
    facility.file(facility.scan(Obs.RUNNING), "raw/running.dat", b"r")
    facility.file(facility.scan(Obs.FAILED), "raw/failed.dat", b"f")
    aborted = facility.file(facility.scan(Obs.ABORTED), "raw/aborted.dat", b"a")
    raw_data_packages_plan()
    [package] = RawDataPackage.objects.all()
    assert list(package.files.all()) == [aborted]


def test_files_arriving_later_for_a_packaged_scan_get_a_new_package(facility: Facility) -> None:
    scan = facility.scan()
    facility.file(scan, "raw/a.dat", b"a")
    raw_data_packages_plan()
    facility.file(scan, "raw/b.dat", b"b")
    raw_data_packages_plan()
    names = sorted(RawDataPackage.objects.values_list("name", flat=True))
    assert len(names) == 2 and names[0].endswith("_001.tar") and names[1].endswith("_002.tar")


# --- building ------------------------------------------------------------------------------------
def test_behaviour_8_the_tar_preserves_relative_paths_and_contents(facility: Facility) -> None:
    scan = facility.scan()
    contents = {"chai/lfa/2026/scan1/a.fits": b"A" * 5000, "chai/lfa/b.fits": b"B" * 77}
    for relative, data in contents.items():
        facility.file(scan, relative, data)
    raw_data_packages_plan()
    package = claim_and_build(RawDataPackage.objects.get())

    tar_path = Path(facility.buffer.root_path) / package.relative_path
    assert members(tar_path) == contents
    data = tar_path.read_bytes()
    assert package.checksum == hashlib.sha256(data).hexdigest()
    assert package.size == len(data)
    assert (package.status, package.state) == (Status.COMPLETED, PackageState.WAITING)
    assert package.origin_location == facility.buffer
    assert package.claim_token == "" and package.finished_at is not None
    # No temporary file is left next to the tar.
    assert [p.name for p in tar_path.parent.iterdir()] == [tar_path.name]


def test_behaviour_10_the_package_lands_in_the_highest_priority_active_buffer_of_the_site(
    facility: Facility,
) -> None:
    other_site_buffer = f.DataLocationFactory(location_type=LT.BUFFER, priority=100)
    assert package_buffer(facility.source) == facility.buffer
    facility.buffer.active = False
    facility.buffer.save()
    assert package_buffer(facility.source) == facility.spare
    assert other_site_buffer != facility.spare
    facility.spare.active = False
    facility.spare.save()
    with pytest.raises(StorageUnavailable, match="no active BUFFER"):
        package_buffer(facility.source)


def test_the_buffer_copy_is_registered_verified_with_the_tar_checksum(facility: Facility) -> None:
    facility.file(facility.scan(), "raw/a.dat", b"data")
    raw_data_packages_plan()
    package = claim_and_build(RawDataPackage.objects.get())
    [copy] = PhysicalCopy.objects.filter(raw_data_package=package)
    assert copy.location == facility.buffer
    assert (copy.status, copy.integrity) == ("present", "verified")
    assert copy.verified_checksum == package.checksum
    assert copy.relative_path == package.relative_path


def test_a_file_that_rotted_after_ingest_fails_the_package_and_leaves_no_tar(
    facility: Facility,
) -> None:
    scan = facility.scan()
    facility.file(scan, "raw/a.dat", b"good")
    facility.file(scan, "raw/b.dat", b"good")
    (Path(facility.source.root_path) / "raw/b.dat").write_bytes(b"gold")  # same size
    raw_data_packages_plan()
    package = RawDataPackage.objects.get()
    claim = operation_claim_batch(RawDataPackage, owner="m", limit=1)

    with pytest.raises(
        SourceFileCorrupt, match=r"raw/b\.dat does not match its registered checksum"
    ) as info:
        raw_data_package_build(package.pk, token=claim.token, owner="w")
    build_raw_data_package.on_failure(
        info.value, "t", (package.pk,), {"claim_token": claim.token}, None
    )

    package.refresh_from_db()
    # Not retryable: the same bytes would be read again. The package fails for good, at once.
    assert (package.status, package.state, package.retry_count) == ("failed", "failed", 0)
    assert "raw/b.dat" in package.failure_error_message
    assert not [p for p in Path(facility.buffer.root_path).rglob("*") if p.is_file()]
    assert not PhysicalCopy.objects.filter(raw_data_package=package).exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [("truncate", "registered as 4"), ("delete", "is missing")],
)
def test_a_missing_or_resized_file_fails_with_a_clear_message(
    facility: Facility, change: str, message: str
) -> None:
    facility.file(facility.scan(), "raw/a.dat", b"good")
    path = Path(facility.source.root_path) / "raw/a.dat"
    if change == "truncate":
        path.write_bytes(b"go")
    else:
        path.unlink()
    raw_data_packages_plan()
    with pytest.raises(SourceFileCorrupt, match=message):
        claim_and_build(RawDataPackage.objects.get())


def test_a_build_without_its_claim_does_nothing(facility: Facility) -> None:
    facility.file(facility.scan(), "raw/a.dat", b"a")
    raw_data_packages_plan()
    package = RawDataPackage.objects.get()
    operation_claim_batch(RawDataPackage, owner="m", limit=1)
    with pytest.raises(ClaimLost):
        raw_data_package_build(package.pk, token="not-the-claim", owner="w")
    package.refresh_from_db()
    assert package.status == Status.SCHEDULED
    assert not any(p.is_file() for p in Path(facility.buffer.root_path).rglob("*"))


def test_a_redelivered_build_task_after_completion_is_a_no_op(facility: Facility) -> None:
    facility.file(facility.scan(), "raw/a.dat", b"a")
    raw_data_packages_plan()
    package = RawDataPackage.objects.get()
    claim = operation_claim_batch(RawDataPackage, owner="m", limit=1)

    first = build_raw_data_package.run(package.pk, claim_token=claim.token)
    again = build_raw_data_package.run(package.pk, claim_token=claim.token)

    assert first["done"] is True and again["done"] is False
    assert PhysicalCopy.objects.filter(raw_data_package=package).count() == 1
    assert [e.to_state for e in _events(package)] == [
        "pending",
        "scheduled",
        "in_progress",
        "completed",
    ]


def _events(package: RawDataPackage) -> list[Any]:
    from pipelines.models import StateEvent

    return list(StateEvent.objects.for_object(package).filter(field="status").order_by("id"))


# --- the manager tick ----------------------------------------------------------------------------
def test_the_manager_tick_plans_claims_and_enqueues_on_the_source_queue(
    facility: Facility, monkeypatch, django_capture_on_commit_callbacks
) -> None:
    sent: list[tuple[Any, dict[str, Any], str]] = []

    def fake_apply_async(args: Any, kwargs: Any, queue: str) -> None:
        sent.append((args, kwargs, queue))

    monkeypatch.setattr(build_raw_data_package, "apply_async", fake_apply_async)
    scan = facility.scan()
    facility.file(scan, "raw/a.dat", b"a")
    facility.file(scan, "raw/b.dat", b"b", module=f.InstrumentModuleFactory())

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        counts = packaging_manager_tick(owner="manager-1")

    # Enqueued only once the claim is committed.
    assert len(callbacks) == 2
    assert counts == {"planned": 2, "claimed": 2, "dispatched": 2}
    tokens = {kwargs["claim_token"] for _args, kwargs, _queue in sent}
    assert len(tokens) == 1
    assert {queue for *_rest, queue in sent} == {"obs_instrument_raw_data_package_creation"}
    for (package_id,), kwargs, _queue in sent:
        row = RawDataPackage.objects.get(pk=package_id)
        assert (row.status, row.claim_token) == (Status.SCHEDULED, kwargs["claim_token"])
    # A second tick finds nothing new to plan or claim.
    assert packaging_manager_tick(owner="manager-1") == {
        "planned": 0,
        "claimed": 0,
        "dispatched": 0,
    }


def test_the_io_error_of_a_full_buffer_is_retryable(facility: Facility, monkeypatch) -> None:
    facility.file(facility.scan(), "raw/a.dat", b"a")
    raw_data_packages_plan()

    def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipelines.storage.tars.open", no_space, raising=False)
    with pytest.raises(OSError) as info:
        claim_and_build(RawDataPackage.objects.get())
    assert is_retryable(info.value)
    assert RawDataFile.objects.filter(raw_data_package__isnull=False).count() == 1
    assert not [p for p in Path(facility.buffer.root_path).rglob("*") if p.is_file()]


def test_a_partial_tar_left_by_a_killed_worker_is_removed_by_the_next_attempt(
    facility: Facility,
) -> None:
    facility.file(facility.scan(), "raw/a.dat", b"a")
    raw_data_packages_plan()
    package = RawDataPackage.objects.get()
    target = Path(facility.buffer.root_path) / package.relative_path
    target.parent.mkdir(parents=True)
    leftover = target.with_name(f".{target.name}.0123456789ab.partial")
    leftover.write_bytes(b"half a tar")

    claim_and_build(package)

    assert not leftover.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_package_names_are_safe_for_any_module_name(facility: Facility) -> None:
    module = f.InstrumentModuleFactory(name="280 GHz / LFA")
    facility.file(facility.scan(), "raw/a.dat", b"a", module=module)
    raw_data_packages_plan()
    package = RawDataPackage.objects.get()
    assert "_280-GHz-LFA_001.tar" in package.name
    assert " " not in package.relative_path and package.relative_path.count("/") == 4
