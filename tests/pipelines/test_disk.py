"""The disk monitor: measuring a location's usage (statvfs, an allowance counted from the
database, S3 object sizes), the history it keeps, and the hysteresis of ``accepting_writes``."""

from __future__ import annotations

import io
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from pipelines.models import DataLocation, DataLocationUsage, PhysicalCopyStatus
from pipelines.services import disk
from pipelines.services.disk import Usage, disk_monitor_tick, location_measure_usage
from pipelines.storage.base import storage_for
from tests import factories as f
from tests.pipelines.test_storage_contract import (
    TEST_KEY_ID,
    TEST_SECRET,
    moto_endpoint,
    new_bucket,
)

__all__ = ["moto_endpoint"]  # a fixture, used by name
pytestmark = pytest.mark.django_db
LT = DataLocation.LocationType
NOTHING = {"stopped_writes": 0, "resumed_writes": 0, "failed": 0}


@pytest.fixture(autouse=True)
def _forget_failures() -> None:
    disk._last_failure.clear()


def disk_location(root: Path, **fields: Any) -> DataLocation:
    root.mkdir(parents=True, exist_ok=True)
    location: DataLocation = f.DataLocationFactory(root_path=str(root), **fields)
    return location


def fix_usage(monkeypatch: pytest.MonkeyPatch, used: int, total: int) -> None:
    """Make every measurement report ``used`` of ``total`` bytes."""
    monkeypatch.setattr(
        disk, "location_usage", lambda location: Usage(used=used, free=total - used, total=total)
    )


# --- measuring ------------------------------------------------------------------------------------
def test_a_disk_location_is_measured_with_statvfs_like_df(tmp_path: Path) -> None:
    location = disk_location(tmp_path / "buffer")
    row = location_measure_usage(location)

    vfs = os.statvfs(tmp_path)
    block = vfs.f_frsize
    # Other processes write to the same file system meanwhile: allow some slack.
    assert abs(row.used_bytes - (vfs.f_blocks - vfs.f_bfree) * block) < 64 * 1024 * 1024
    assert abs((row.free_bytes or 0) - vfs.f_bavail * block) < 64 * 1024 * 1024
    assert row.total_bytes == row.used_bytes + row.free_bytes
    location.refresh_from_db()
    assert (location.used_bytes, location.free_bytes) == (row.used_bytes, row.free_bytes)
    assert location.usage_measured_at == row.measured_at
    assert list(DataLocationUsage.objects.filter(location=location)) == [row]


def test_with_a_capacity_a_disk_location_counts_its_live_copies_and_dark_files(
    tmp_path: Path,
) -> None:
    location = disk_location(tmp_path / "buffer", capacity_bytes=100_000)
    package = f.RawDataPackageFactory(size=30_000)
    f.PhysicalCopyFactory(raw_data_package=package, location=location)
    raw_file = f.RawDataFileFactory(size=5_000)
    f.PhysicalCopyFactory(
        kind="raw_data_file",
        raw_data_package=None,
        raw_data_file=raw_file,
        location=location,
        relative_path=raw_file.relative_path,
    )
    # A deleted copy no longer takes space; a dark file does.
    f.PhysicalCopyFactory(
        raw_data_package=f.RawDataPackageFactory(size=50_000),
        location=location,
        status=PhysicalCopyStatus.DELETED,
    )
    f.DarkFileFactory(location=location, size_bytes=1_000)

    row = location_measure_usage(location)

    assert (row.used_bytes, row.free_bytes, row.total_bytes) == (36_000, 64_000, 100_000)
    assert Usage(36_000, 64_000, 100_000).percent == pytest.approx(36.0)


def test_a_full_file_system_makes_a_location_with_an_unused_allowance_full_too() -> None:
    # 10 % of the allowance used, but the file system has only 1 % of it left.
    usage = Usage(used=10, free=1, total=100)
    assert usage.percent == pytest.approx(99.0)
    # An overdrawn allowance reads above 100 %.
    assert Usage(used=150, free=0, total=100).percent == pytest.approx(150.0)
    assert Usage(used=5, free=None, total=None).percent is None


def test_an_s3_location_is_measured_by_summing_its_object_sizes(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = f.SiteFactory(short_name="cologne")
    location = f.DataLocationFactory(
        site=site,
        name="lta",
        location_type=LT.LONG_TERM_ARCHIVE,
        storage_type=DataLocation.StorageType.S3,
        root_path="",
        s3_endpoint_url=moto_endpoint,
        s3_bucket=new_bucket(moto_endpoint),
        s3_region="us-east-1",
        s3_prefix="archive",
        capacity_bytes=10_000,
    )
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_ACCESS_KEY_ID", TEST_KEY_ID)
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_SECRET_ACCESS_KEY", TEST_SECRET)
    storage = storage_for(location)
    for index, size in enumerate((1_000, 2_500, 4_000)):
        storage.put_stream(f"p/{index}.tar", io.BytesIO(b"x" * size), algorithm="sha256")
    # Objects outside the prefix belong to someone else.
    storage.client.put_object(Bucket=location.s3_bucket, Key="other/x", Body=b"y" * 999)

    row = location_measure_usage(location)

    assert (row.used_bytes, row.free_bytes, row.total_bytes) == (7_500, 2_500, 10_000)


def test_an_s3_location_without_a_capacity_is_measured_but_never_marked_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    location = f.DataLocationFactory(accepting_writes=True)
    monkeypatch.setattr(
        disk, "location_usage", lambda location: Usage(used=10**15, free=None, total=None)
    )
    row = location_measure_usage(location)
    location.refresh_from_db()
    assert (row.used_bytes, row.free_bytes, location.used_bytes) == (10**15, None, 10**15)
    assert location.accepting_writes is True


# --- hysteresis -----------------------------------------------------------------------------------
def test_past_the_high_water_mark_a_location_stops_accepting_writes_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    location = f.DataLocationFactory(high_water_percent=90, cleanup_percent=80)
    fix_usage(monkeypatch, used=90, total=100)
    with caplog.at_level(logging.WARNING, logger="pipelines.services.disk"):
        location_measure_usage(location)
    location.refresh_from_db()
    assert location.accepting_writes is False
    assert "90.0% full" in caplog.text and "high-water mark of 90%" in caplog.text


def test_between_the_marks_nothing_changes_in_either_direction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    full = f.DataLocationFactory(accepting_writes=False, high_water_percent=90, cleanup_percent=80)
    open_ = f.DataLocationFactory(accepting_writes=True, high_water_percent=90, cleanup_percent=80)
    for used in (80, 85, 89):
        fix_usage(monkeypatch, used=used, total=100)
        location_measure_usage(full)
        location_measure_usage(open_)
        full.refresh_from_db()
        open_.refresh_from_db()
        assert (full.accepting_writes, open_.accepting_writes) == (False, True), used


def test_below_the_cleanup_mark_a_full_location_accepts_writes_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    location = f.DataLocationFactory(high_water_percent=90, cleanup_percent=80)
    steps = [(95, False), (85, False), (80, False), (79, True), (85, True), (90, False)]
    for used, accepting in steps:
        fix_usage(monkeypatch, used=used, total=100)
        location_measure_usage(location)
        location.refresh_from_db()
        assert location.accepting_writes is accepting, used
    history = DataLocationUsage.objects.filter(location=location).order_by("pk")
    assert [row.used_bytes for row in history] == [used for used, _ in steps]


def test_a_measurement_writes_only_the_measured_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    location = f.DataLocationFactory(priority=5)
    # An operator changes the priority after the monitor loaded the row.
    DataLocation.objects.filter(pk=location.pk).update(priority=7)
    fix_usage(monkeypatch, used=10, total=100)
    location_measure_usage(location)
    location.refresh_from_db()
    assert (location.priority, location.used_bytes) == (7, 10)


# --- the manager tick -----------------------------------------------------------------------------
def test_the_tick_measures_each_active_disk_location_once_per_interval(
    tmp_path: Path, settings: Any
) -> None:
    settings.WORKFLOW_DISK_MONITOR_INTERVAL = 300
    one = disk_location(tmp_path / "one")
    two = disk_location(tmp_path / "two")
    disk_location(tmp_path / "off", active=False)
    f.DataLocationFactory(storage_type=DataLocation.StorageType.TAPE, root_path="")
    now = timezone.now()

    def measurements() -> int:
        return DataLocationUsage.objects.filter(location__in=[one, two]).count()

    # A measurement that changes nothing is not "work" for the runner's --until-idle.
    assert disk_monitor_tick(owner="test", now=now) == NOTHING
    assert measurements() == 2
    disk_monitor_tick(owner="test", now=now + timedelta(seconds=60))
    assert measurements() == 2
    disk_monitor_tick(owner="test", now=now + timedelta(seconds=300))
    assert measurements() == 4
    assert DataLocationUsage.objects.count() == 4


def test_the_tick_counts_the_locations_whose_writes_stopped_or_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = disk_location(tmp_path / "full")
    drained = disk_location(tmp_path / "drained", accepting_writes=False)
    monkeypatch.setattr(
        disk,
        "location_usage",
        lambda location: (
            Usage(used=95, free=5, total=100)
            if location.pk == full.pk
            else Usage(used=10, free=90, total=100)
        ),
    )
    counts = disk_monitor_tick(owner="test")
    assert counts == {"stopped_writes": 1, "resumed_writes": 1, "failed": 0}
    full.refresh_from_db()
    drained.refresh_from_db()
    assert (full.accepting_writes, drained.accepting_writes) == (False, True)


def test_an_unreachable_location_is_logged_and_retried_after_an_interval_not_every_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, settings: Any
) -> None:
    settings.WORKFLOW_DISK_MONITOR_INTERVAL = 300
    good = disk_location(tmp_path / "good")
    lost = f.DataLocationFactory(root_path=str(tmp_path / "not-mounted"))
    with caplog.at_level(logging.WARNING, logger="pipelines.services.disk"):
        counts = disk_monitor_tick(owner="test")
    assert counts["failed"] == 1
    assert f"cannot measure {lost}" in caplog.text and "not mounted" in caplog.text
    lost.refresh_from_db()
    assert lost.usage_measured_at is None and lost.accepting_writes is True
    assert not DataLocationUsage.objects.filter(location=lost).exists()
    # The next round (seconds later) neither retries it nor counts it again.
    assert DataLocationUsage.objects.filter(location=good).count() == 1
    assert disk_monitor_tick(owner="test") == NOTHING
