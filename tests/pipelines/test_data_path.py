"""The data path from the observatory buffer to two archive sites: bundling, transfers along
primary and secondary routes, unpacking, long-term archive. Named after behaviours 11 and 19-25
of the ops-db brief. Managers are ticked in this process; the tasks they enqueue are called
directly (their ``run``) instead of going through a broker."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from pipelines import tasks
from pipelines.exceptions import ChecksumMismatch
from pipelines.managers import MANAGERS, manager_tick
from pipelines.models import (
    DataLocation,
    DataTransfer,
    DataTransferPackage,
    DataTransferRoute,
    ExecutedObsUnit,
    LongTermArchiveTransfer,
    PackageState,
    PhysicalCopy,
    RawDataPackage,
    StateEvent,
    Status,
)
from pipelines.services import transfers
from pipelines.services.transfers import route_destination
from tests import factories as f
from tests.pipelines.test_storage_contract import moto_endpoint, new_bucket, raw_s3_client

__all__ = ["moto_endpoint"]  # a fixture, used by name
pytestmark = pytest.mark.django_db
LT = DataLocation.LocationType
WORKER_TASKS = (
    tasks.build_raw_data_package,
    tasks.build_data_transfer_package,
    tasks.transfer_data_transfer_package,
    tasks.unpack_data_transfer,
    tasks.send_data_to_long_term_archive,
    tasks.stage_data_task,
)


class Facility:
    """An observatory (``ccat``: instrument SOURCE and buffer) and two archive sites
    (``cologne``, ``us``: buffer and long-term archive), on disk under ``root``."""

    def __init__(self, root: Path, monkeypatch: Any, on_commit: Any) -> None:
        self.root = root
        # The test's transaction never commits: run what a commit would start, per tick.
        self.on_commit = on_commit
        self.ccat = f.SiteFactory(short_name="ccat")
        self.source = self.location(self.ccat, "instrument", LT.SOURCE)
        self.location(self.ccat, "buffer", LT.BUFFER)
        self.sites = {}
        for name in ("cologne", "us"):
            site = f.SiteFactory(short_name=name)
            self.location(site, "buffer", LT.BUFFER)
            self.location(site, "lta", LT.LONG_TERM_ARCHIVE)
            self.sites[name] = site
        self.processing = self.location(self.sites["cologne"], "processing", LT.PROCESSING)
        for name in ("cologne", "us"):
            DataTransferRoute.objects.create(
                name=f"ccat_to_{name}",
                origin_site=self.ccat,
                destination_site=self.sites[name],
                is_primary=True,
            )
        DataTransferRoute.objects.create(
            name="cologne_to_us",
            origin_site=self.sites["cologne"],
            destination_site=self.sites["us"],
        )
        DataTransferRoute.objects.create(
            name="us_to_cologne",
            origin_site=self.sites["us"],
            destination_site=self.sites["cologne"],
        )
        self.module = f.InstrumentModuleFactory(name="lfa")
        self.failures: list[BaseException] = []
        # Enqueued tasks run here and now, their failures reported as a worker would.
        for task in WORKER_TASKS:
            monkeypatch.setattr(task, "apply_async", self._runner(task))

    def _runner(self, task: Any) -> Any:
        def apply_async(args: list[Any], kwargs: dict[str, Any], queue: str) -> None:
            try:
                task.run(*args, **kwargs)
            except Exception as exc:
                self.failures.append(exc)
                task.on_failure(exc, "task-id", tuple(args), kwargs, None)

        return apply_async

    def location(self, site: Any, name: str, kind: str) -> DataLocation:
        location: DataLocation = f.DataLocationFactory(
            site=site, name=name, location_type=kind, root_path=self.root / site.short_name / name
        )
        Path(location.root_path).mkdir(parents=True)
        return location

    def at(self, site: str, name: str) -> DataLocation:
        return DataLocation.objects.get(site__short_name=site, name=name)

    def scan(self, files: int = 2) -> ExecutedObsUnit:
        scan: ExecutedObsUnit = f.ExecutedObsUnitFactory(status="completed")
        for i in range(files):
            data = f"{scan.pk}-{i}".encode() * 100
            relative = f"raw/{scan.pk}/{i}.dat"
            path = Path(self.source.root_path) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            f.RawDataFileFactory(
                relative_path=relative,
                size=len(data),
                checksum=hashlib.sha256(data).hexdigest(),
                executed_obs_unit=scan,
                instrument_module=self.module,
                source_location=self.source,
            )
        return scan

    def tick(self, *names: str) -> None:
        for name in names or tuple(MANAGERS):
            with self.on_commit(execute=True):
                manager_tick(name, owner="test")

    def run_until_idle(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            before = _fingerprint()
            self.tick()
            if _fingerprint() == before:
                return
        raise AssertionError("the data path did not settle")


def _fingerprint() -> tuple[int, int]:
    return StateEvent.objects.count(), PhysicalCopy.objects.count()


@pytest.fixture
def facility(tmp_path: Path, monkeypatch: Any, django_capture_on_commit_callbacks: Any) -> Any:
    return Facility(tmp_path, monkeypatch, django_capture_on_commit_callbacks)


def _archive_sites(package: RawDataPackage) -> set[str]:
    return set(
        PhysicalCopy.objects.filter(
            raw_data_package=package,
            location__location_type=LT.LONG_TERM_ARCHIVE,
            status="present",
            integrity="verified",
        ).values_list("location__site__short_name", flat=True)
    )


def test_every_package_ends_archived_with_verified_copies_at_both_archive_sites(
    facility: Facility,
) -> None:
    for _ in range(3):
        facility.scan()
    facility.run_until_idle()

    assert facility.failures == []
    packages = list(RawDataPackage.objects.all())
    assert len(packages) == 3
    for package in packages:
        assert package.state == PackageState.ARCHIVED and package.archived_at is not None
        assert _archive_sites(package) == {"cologne", "us"}
        for copy in PhysicalCopy.objects.filter(raw_data_package=package):
            stored = Path(copy.location.root_path) / copy.relative_path
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == package.checksum
    # Nothing left claimed or pending anywhere.
    for model in (DataTransferPackage, DataTransfer, LongTermArchiveTransfer):
        assert not model.objects.exclude(status=Status.COMPLETED).exists()
    assert not DataTransfer.objects.exclude(unpack_status=Status.COMPLETED).exists()


def test_behaviour_11_a_package_waits_until_it_joins_a_bundle_then_it_is_transferring(
    facility: Facility,
) -> None:
    facility.scan()
    facility.tick("packaging")
    package = RawDataPackage.objects.get()
    assert (package.status, package.state) == (Status.COMPLETED, PackageState.WAITING)
    facility.tick("bundling")
    package.refresh_from_db()
    assert package.state == PackageState.TRANSFERRING
    assert package.data_transfer_package is not None
    [event] = StateEvent.objects.for_object(package).filter(field="state")
    assert (event.from_state, event.to_state) == ("waiting", "transferring")


def test_behaviours_20_23_24_each_bundle_leaves_once_round_robin_then_goes_on_between_archives(
    facility: Facility,
) -> None:
    for _ in range(3):
        facility.scan()
        facility.tick("packaging", "bundling")
    facility.run_until_idle()

    primaries = DataTransfer.objects.filter(is_primary=True).order_by("pk")
    assert [t.destination_location.site.short_name for t in primaries] == [
        "cologne",
        "us",
        "cologne",
    ]
    for bundle in DataTransferPackage.objects.all():
        legs = {
            (
                t.is_primary,
                t.origin_location.site.short_name,
                t.destination_location.site.short_name,
            )
            for t in bundle.transfers.all()
        }
        # One departure from the observatory, one onward copy between the archive sites.
        assert len([leg for leg in legs if leg[0]]) == 1
        assert len(legs) == 2
        assert {leg[2] for leg in legs} == {"cologne", "us"}
        assert all(leg[1] != "ccat" for leg in legs if not leg[0])


def test_behaviour_19_a_package_is_archived_only_after_its_archive_copy_reads_back_right(
    facility: Facility, monkeypatch: Any
) -> None:
    facility.scan()
    from pipelines.storage.posix import PosixStorage

    real = PosixStorage.checksum
    broken = {"left": 1}

    def rotten_on_the_way_in(self: Any, path: str, algorithm: str) -> tuple[str, int]:
        digest, size = real(self, path, algorithm)
        if self.label.endswith(":lta") and broken["left"]:
            broken["left"] -= 1
            return "0" * len(digest), size
        return digest, size

    monkeypatch.setattr(PosixStorage, "checksum", rotten_on_the_way_in)
    facility.run_until_idle()

    [mismatch] = [e for e in facility.failures if isinstance(e, ChecksumMismatch)]
    assert "the archived object was removed" in str(mismatch)
    package = RawDataPackage.objects.get()
    # The bad archive write was retried and the package archived only by the good one.
    assert package.state == PackageState.ARCHIVED
    assert LongTermArchiveTransfer.objects.filter(retry_count=1).count() == 1
    assert _archive_sites(package) == {"cologne", "us"}


def test_behaviours_21_22_an_unpack_mismatch_registers_no_copy_and_is_retried_not_recopied(
    facility: Facility, monkeypatch: Any
) -> None:
    facility.scan()
    facility.tick("packaging", "bundling", "transfer")
    [transfer] = DataTransfer.objects.all()
    assert transfer.status == Status.COMPLETED
    package = RawDataPackage.objects.get()
    real = RawDataPackage.objects.get(pk=package.pk).checksum
    # The registered checksum disagrees with what arrived (as if a byte flipped before bundling).
    RawDataPackage.objects.filter(pk=package.pk).update(checksum="f" * 64)

    facility.tick("unpack")

    transfer.refresh_from_db()
    assert (transfer.status, transfer.unpack_status) == (Status.COMPLETED, Status.PENDING)
    assert (transfer.retry_count, transfer.unpack_retry_count) == (0, 1)
    assert "hashes to" in transfer.unpack_error_message
    here = transfer.destination_location
    assert not PhysicalCopy.objects.filter(raw_data_package=package, location=here).exists()
    assert not (Path(here.root_path) / package.relative_path).exists()

    RawDataPackage.objects.filter(pk=package.pk).update(checksum=real)
    facility.tick("unpack")
    transfer.refresh_from_db()
    assert transfer.unpack_status == Status.COMPLETED
    assert DataTransfer.objects.count() == 1  # retried without copying again
    assert PhysicalCopy.objects.get(raw_data_package=package, location=here).integrity == "verified"


def test_a_byte_flipped_in_transit_registers_no_copy_and_the_transfer_is_retried(
    facility: Facility, monkeypatch: Any
) -> None:
    facility.scan()
    facility.tick("packaging", "bundling")
    real_copy = transfers.copy
    flips = {"left": 1}

    def flipping_copy(source: Any, path: str, target: Any, dest: str, **kw: Any) -> Any:
        result = real_copy(source, path, target, dest, **kw)
        if flips["left"]:
            flips["left"] -= 1
            stored = Path(target.root) / dest if hasattr(target, "root") else None
            assert stored is not None
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
        return result

    monkeypatch.setattr(transfers, "copy", flipping_copy)
    facility.tick("transfer")

    [transfer] = DataTransfer.objects.all()
    assert (transfer.status, transfer.retry_count) == (Status.PENDING, 1)
    assert "reads back as" in transfer.failure_error_message
    bundle = transfer.data_transfer_package
    assert not PhysicalCopy.objects.filter(
        data_transfer_package=bundle, location=transfer.destination_location
    ).exists()
    facility.run_until_idle()
    transfer.refresh_from_db()
    assert (transfer.status, transfer.retry_count) == (Status.COMPLETED, 1)
    assert RawDataPackage.objects.get().state == PackageState.ARCHIVED


def test_behaviour_25_an_explicit_destination_location_wins_over_the_discovered_one(
    facility: Facility,
) -> None:
    route = DataTransferRoute.objects.get(name="ccat_to_cologne")
    assert route_destination(route) == facility.at("cologne", "buffer")
    spare = facility.location(facility.sites["cologne"], "spare", LT.BUFFER)
    DataTransferRoute.objects.filter(pk=route.pk).update(destination_location=spare)
    route.refresh_from_db()
    assert route_destination(route) == spare
    # A DIRECT route skips the destination buffer: it delivers into the archive.
    direct = DataTransferRoute.objects.get(name="cologne_to_us")
    direct.route_type = DataTransferRoute.RouteType.DIRECT
    assert route_destination(direct) == facility.at("us", "lta")


def test_behaviour_33_an_archive_on_s3_gets_verified_copies_with_credentials_from_the_environment(
    facility: Facility, monkeypatch: Any, moto_endpoint: str
) -> None:
    key_id, secret = "AKIADATAPATHTEST", "data-path-secret-never-in-the-database"
    bucket = new_bucket(moto_endpoint)
    DataLocation.objects.filter(site__short_name="us", name="lta").update(
        storage_type=DataLocation.StorageType.S3,
        root_path="",
        s3_endpoint_url=moto_endpoint,
        s3_bucket=bucket,
        s3_region="us-east-1",
        s3_prefix="ccat",
    )
    monkeypatch.setenv("WORKFLOW_S3_US_LTA_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("WORKFLOW_S3_US_LTA_SECRET_ACCESS_KEY", secret)
    facility.scan()

    facility.run_until_idle()

    assert facility.failures == []
    package = RawDataPackage.objects.get()
    assert package.state == PackageState.ARCHIVED
    assert _archive_sites(package) == {"cologne", "us"}
    stored = (
        raw_s3_client(moto_endpoint)
        .get_object(Bucket=bucket, Key=f"ccat/{package.relative_path}")["Body"]
        .read()
    )
    assert hashlib.sha256(stored).hexdigest() == package.checksum
    for row in DataLocation.objects.values():
        assert secret not in str(row) and key_id not in str(row)


# --- staging -------------------------------------------------------------------------------------
def _archived(facility: Facility, scans: int = 1) -> list[RawDataPackage]:
    for _ in range(scans):
        facility.scan()
    facility.run_until_idle()
    return list(RawDataPackage.objects.filter(state=PackageState.ARCHIVED))


def _staged(facility: Facility) -> dict[str, str]:
    return dict(
        PhysicalCopy.objects.filter(location=facility.processing).values_list(
            "relative_path", "status"
        )
    )


def test_behaviour_34_a_staging_job_unpacks_archived_packages_verified_and_staged(
    facility: Facility,
) -> None:
    from pipelines.models import RawDataFile, StagingJob
    from pipelines.services.staging import staging_job_create

    packages = _archived(facility, scans=2)
    job = staging_job_create(packages, destination=facility.processing, actor="test")

    facility.tick("staging")

    job.refresh_from_db()
    assert job.status == Status.COMPLETED and facility.failures == []
    files = RawDataFile.objects.filter(raw_data_package__in=packages)
    assert _staged(facility) == {f.relative_path: "staged" for f in files}
    root = Path(facility.processing.root_path)
    for raw_file in files:
        assert hashlib.sha256((root / raw_file.relative_path).read_bytes()).hexdigest() == (
            raw_file.checksum
        )
    # The tars were removed once unpacked.
    assert not (root / "staging").exists() or not any((root / "staging").rglob("*.tar"))

    # The same job again, or a new job for the same packages: nothing new.
    again = staging_job_create(packages, destination=facility.processing, actor="test")
    facility.tick("staging")
    again.refresh_from_db()
    assert again.status == Status.COMPLETED
    assert PhysicalCopy.objects.filter(location=facility.processing).count() == files.count()
    assert StagingJob.objects.count() == 2


def test_a_corrupt_archive_copy_stages_nothing_and_the_job_is_retried(facility: Facility) -> None:
    from pipelines.services.staging import staging_job_create

    [package] = _archived(facility)
    archived = Path(facility.at("cologne", "lta").root_path) / package.relative_path
    data = bytearray(archived.read_bytes())
    data[100] ^= 0x01
    archived.write_bytes(bytes(data))
    job = staging_job_create([package], destination=facility.processing, actor="test")

    facility.tick("staging")

    job.refresh_from_db()
    assert (job.status, job.retry_count) == (Status.PENDING, 1)
    assert "reads back as" in job.failure_error_message
    assert _staged(facility) == {}
    assert not [p for p in Path(facility.processing.root_path).rglob("*") if p.is_file()]


def test_only_archived_packages_may_be_staged_to_a_processing_location(facility: Facility) -> None:
    from pipelines.exceptions import NonRetryableError
    from pipelines.services.staging import staging_job_create

    facility.scan()
    facility.tick("packaging")
    package = RawDataPackage.objects.get()
    with pytest.raises(NonRetryableError, match="not archived"):
        staging_job_create([package], destination=facility.processing, actor="test")
    with pytest.raises(NonRetryableError, match="not an active PROCESSING"):
        staging_job_create([package], destination=facility.at("us", "lta"), actor="test")


def test_the_stage_command_creates_a_job_and_refuses_bad_input(facility: Facility) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    from pipelines.models import StagingJob

    [package] = _archived(facility)
    for args, message in [
        ((package.name,), "the following arguments are required: --to"),
        ((package.name, "--to", "cologne"), "write SITE:LOCATION"),
        ((package.name, "--to", "atlantis:processing"), "no such location"),
        (("--to", "cologne:processing"), "name packages"),
        (("no-such.tar", "--to", "cologne:processing"), "unknown package"),
        (("--scan", "not-a-uuid", "--to", "cologne:processing"), "not a scan id"),
        ((package.name, "--to", "us:lta"), "not an active PROCESSING"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("stage", *args, stdout=StringIO())
    assert not StagingJob.objects.exists()

    out = StringIO()
    call_command("stage", package.name, "--to", "cologne:processing", "--dry-run", stdout=out)
    assert "dry run: 1 package(s)" in out.getvalue() and not StagingJob.objects.exists()
    out = StringIO()
    call_command(
        "stage",
        "--scan",
        str(package.executed_obs_unit_id),
        "--to",
        "cologne:processing",
        stdout=out,
    )
    [job] = StagingJob.objects.all()
    assert list(job.raw_data_packages.all()) == [package]
    assert f"staging job {job.pk}: 1 package(s)" in out.getvalue()


def test_one_archive_transfer_in_flight_per_package_and_archive_but_a_repair_may_follow(
    facility: Facility,
) -> None:
    from django.db import IntegrityError, transaction

    [package] = _archived(facility)
    lta = facility.at("cologne", "lta")
    done = LongTermArchiveTransfer.objects.get(raw_data_package=package, destination_location=lta)
    assert done.status == Status.COMPLETED
    # A completed transfer does not block re-archiving a copy found corrupt later.
    again = LongTermArchiveTransfer.objects.create(
        raw_data_package=package, origin_location=done.origin_location, destination_location=lta
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        LongTermArchiveTransfer.objects.create(
            raw_data_package=package,
            origin_location=done.origin_location,
            destination_location=lta,
        )
    assert again.status == Status.PENDING


def test_a_full_or_read_only_destination_is_retried_and_nothing_is_lost(
    facility: Facility, monkeypatch: Any
) -> None:
    from pipelines.exceptions import StorageUnavailable
    from pipelines.storage.posix import PosixStorage

    facility.scan()
    real = PosixStorage.put_stream
    refusals = {"left": 2}

    def full_then_freed(self: Any, path: str, reader: Any, *, algorithm: str) -> Any:
        if self.label == "us:lta" and refusals["left"]:
            refusals["left"] -= 1
            raise StorageUnavailable(f"{self.label}: No space left on device (writing {path})")
        return real(self, path, reader, algorithm=algorithm)

    monkeypatch.setattr(PosixStorage, "put_stream", full_then_freed)
    facility.run_until_idle()

    assert len(facility.failures) == 2
    assert all("No space left on device" in str(e) for e in facility.failures)
    package = RawDataPackage.objects.get()
    assert package.state == PackageState.ARCHIVED
    assert _archive_sites(package) == {"cologne", "us"}
    [row] = LongTermArchiveTransfer.objects.filter(destination_location=facility.at("us", "lta"))
    assert (row.status, row.retry_count) == (Status.COMPLETED, 2)
    # Nothing lost on the way: the buffer copy the archive was fed from is still there, intact.
    buffer = facility.at("us", "buffer")
    stored = Path(buffer.root_path) / package.relative_path
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == package.checksum


def test_a_direct_route_skips_the_destination_buffer_and_still_archives_at_both_sites(
    facility: Facility,
) -> None:
    DataTransferRoute.objects.filter(name="ccat_to_us").update(
        route_type=DataTransferRoute.RouteType.DIRECT
    )
    for _ in range(2):
        facility.scan()
        facility.tick("packaging", "bundling")
    facility.run_until_idle()

    assert facility.failures == []
    us_buffer, us_lta = facility.at("us", "buffer"), facility.at("us", "lta")
    direct = DataTransfer.objects.get(is_primary=True, destination_location=us_lta)
    assert (direct.status, direct.unpack_status) == (Status.COMPLETED, Status.COMPLETED)
    for package in direct.data_transfer_package.raw_data_packages.all():
        assert package.state == PackageState.ARCHIVED
        assert _archive_sites(package) == {"cologne", "us"}
        # It never went through the us buffer, and needed no archive transfer at us.
        assert not PhysicalCopy.objects.filter(raw_data_package=package, location=us_buffer)
        assert not LongTermArchiveTransfer.objects.filter(
            raw_data_package=package, destination_location=us_lta
        )


def test_only_arrivals_with_somewhere_left_to_go_are_looked_at_again(facility: Facility) -> None:
    from pipelines.services.transfers import arrivals_to_send_on

    facility.scan()
    facility.tick("packaging", "bundling", "transfer", "unpack")
    [primary] = DataTransfer.objects.all()
    assert list(arrivals_to_send_on()) == [primary]
    facility.run_until_idle()
    # Both archive sites reached: nothing is examined again, tick after tick.
    assert list(arrivals_to_send_on()) == []
    # An onward copy that failed for good reopens the way: found again, and sent again.
    onward = DataTransfer.objects.get(is_primary=False)
    DataTransfer.objects.filter(pk=onward.pk).update(
        status=Status.FAILED, unpack_status=Status.PENDING
    )
    assert list(arrivals_to_send_on()) == [primary]
    facility.tick("transfer")
    assert DataTransfer.objects.filter(is_primary=False).count() == 2
