"""Policy deletion: behaviours 14-18 of the ops-db brief (the rules one by one are in
``test_deletion_rules``, the manager and worker in ``test_deletion_worker``).

``World`` builds a small facility on disk: an observatory (SOURCE with the raw files, BUFFER
with the package tar) and an archive site (BUFFER, LONG_TERM_ARCHIVE with a verified copy,
PROCESSING). Other deletion test modules import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from pipelines.models import (
    DataLocation,
    DeletionTask,
    PackageState,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataPackage,
    StateEvent,
    Status,
)
from pipelines.services.deletion import (
    RETRY_FAILED_AFTER,
    copy_deletion_blocker,
    deletion_manager_tick,
    deletion_verdict,
    physical_copy_delete,
)
from pipelines.services.operations import operation_fail
from tests import factories as f

CS = PhysicalCopyStatus
LT = DataLocation.LocationType


@dataclass
class World:
    source: DataLocation
    obs_buffer: DataLocation
    arc_buffer: DataLocation
    lta: DataLocation
    processing: DataLocation
    package: RawDataPackage
    files: list[Any]
    source_copies: list[PhysicalCopy]
    buffer_copy: PhysicalCopy
    lta_copy: PhysicalCopy

    def write(self, copy: PhysicalCopy, data: bytes = b"data") -> Path:
        path = Path(copy.location.root_path) / copy.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def path(self, copy: PhysicalCopy) -> Path:
        return Path(copy.location.root_path) / copy.relative_path


def make_world(tmp_path: Path, *, archived_days_ago: float = 10, n_files: int = 2) -> World:
    now = timezone.now()
    obs = f.SiteFactory(short_name="obs")
    arc = f.SiteFactory(short_name="arc")

    def loc(site: Any, name: str, kind: str) -> DataLocation:
        return f.DataLocationFactory(
            site=site,
            name=name,
            location_type=kind,
            root_path=str(tmp_path / site.short_name / name),
        )

    source = loc(obs, "source", LT.SOURCE)
    obs_buffer = loc(obs, "buffer", LT.BUFFER)
    arc_buffer = loc(arc, "buffer", LT.BUFFER)
    lta = loc(arc, "lta", LT.LONG_TERM_ARCHIVE)
    processing = loc(arc, "processing", LT.PROCESSING)
    package = f.RawDataPackageFactory(
        state=PackageState.ARCHIVED,
        status=Status.COMPLETED,
        archived_at=now - timedelta(days=archived_days_ago),
        origin_location=obs_buffer,
    )
    files = [
        f.RawDataFileFactory(
            source_location=source,
            raw_data_package=package,
            executed_obs_unit=package.executed_obs_unit,
            instrument_module=package.instrument_module,
        )
        for _ in range(n_files)
    ]
    world = World(
        source=source,
        obs_buffer=obs_buffer,
        arc_buffer=arc_buffer,
        lta=lta,
        processing=processing,
        package=package,
        files=files,
        source_copies=[file_copy(raw, source) for raw in files],
        buffer_copy=package_copy(package, obs_buffer),
        lta_copy=package_copy(package, lta),
    )
    for copy in [*world.source_copies, world.buffer_copy, world.lta_copy]:
        world.write(copy)
    return world


def package_copy(package: RawDataPackage, location: DataLocation, **kwargs: Any) -> PhysicalCopy:
    values: dict[str, Any] = {
        "integrity": PhysicalCopy.Integrity.VERIFIED,
        "checksum_verified_at": timezone.now(),
        "verified_checksum": package.checksum,
    }
    values.update(kwargs)
    return f.PhysicalCopyFactory(raw_data_package=package, location=location, **values)


def file_copy(raw: Any, location: DataLocation, **kwargs: Any) -> PhysicalCopy:
    values: dict[str, Any] = {
        "integrity": PhysicalCopy.Integrity.VERIFIED,
        "checksum_verified_at": timezone.now(),
        "verified_checksum": raw.checksum,
    }
    values.update(kwargs)
    return f.PhysicalCopyFactory(
        kind=PhysicalCopy.Kind.RAW_DATA_FILE,
        raw_data_package=None,
        raw_data_file=raw,
        location=location,
        relative_path=raw.relative_path,
        **values,
    )


def statuses(copy: PhysicalCopy) -> list[str]:
    """The status path of a copy from its events, oldest first."""
    return list(
        StateEvent.objects.filter(entity="physical_copy", object_id=str(copy.pk), field="status")
        .order_by("pk")
        .values_list("to_state", flat=True)
    )


def run_tasks(owner: str = "test") -> list[DeletionTask]:
    """Run every claimed deletion task the way a worker would (the tick's dispatch happens on
    commit, which the test transaction never does)."""
    done = []
    for task in DeletionTask.objects.filter(status=Status.SCHEDULED).order_by("pk"):
        done.append(physical_copy_delete(task.pk, token=task.claim_token, owner=owner))
    return done


def drain(now: Any = None, rounds: int = 6) -> None:
    for _ in range(rounds):
        counts = deletion_manager_tick(owner="test", now=now)
        run_tasks()
        if not any(counts.values()):
            return


# --- behaviours 14-18 ----------------------------------------------------------------------------
@pytest.mark.django_db
def test_behaviour_14_a_normal_deletion_passes_scheduled_and_in_progress_on_its_way_to_deleted(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    counts = deletion_manager_tick(owner="test")
    assert counts["scheduled"] == 3  # two source files and the observatory buffer's tar
    assert counts["claimed"] == 3
    run_tasks()
    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    assert copy.status == CS.DELETED
    assert copy.deleted_at is not None
    assert "archived" in copy.deletion_reason
    assert statuses(copy) == ["deletion_scheduled", "deletion_in_progress", "deleted"]
    assert not world.path(copy).exists()
    reasons = StateEvent.objects.filter(
        entity="physical_copy", object_id=str(copy.pk), field="status"
    ).values_list("reason", flat=True)
    assert all(copy.deletion_reason in reason for reason in reasons)
    # Every DELETED copy anywhere took both intermediate steps; the archive copy stays.
    for deleted in PhysicalCopy.objects.filter(status=CS.DELETED):
        path = statuses(deleted)
        assert path[-3:] == ["deletion_scheduled", "deletion_in_progress", "deleted"]
    assert PhysicalCopy.objects.get(pk=world.lta_copy.pk).status == CS.PRESENT
    assert world.path(world.lta_copy).exists()
    task = DeletionTask.objects.get(physical_copy=copy)
    assert task.status == Status.COMPLETED and task.reason == copy.deletion_reason


@pytest.mark.django_db
def test_behaviour_15_a_failed_deletion_ends_in_deletion_failed_and_is_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.storage.posix import PosixStorage

    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)

    def refuse(self: Any, relative_path: str) -> None:
        raise PermissionError(f"read-only file system: {relative_path}")

    monkeypatch.setattr(PosixStorage, "delete", refuse)
    with pytest.raises(PermissionError):
        physical_copy_delete(task.pk, token=task.claim_token, owner="test")
    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    assert copy.status == CS.DELETION_FAILED
    assert "read-only file system" in copy.last_error
    assert copy.retry_count == 1
    # The task base class gives up on this task (no retries left): the copy is retried later.
    assert operation_fail(
        DeletionTask, task.pk, token=task.claim_token, message="x", actor="t", retryable=False
    )
    monkeypatch.undo()
    deletion_manager_tick(owner="test")
    copy.refresh_from_db()
    assert copy.status == CS.DELETION_FAILED  # not yet: it waits RETRY_FAILED_AFTER
    assert "tried again after" in copy_deletion_blocker(copy)
    later = timezone.now() + RETRY_FAILED_AFTER + timedelta(minutes=1)
    counts = deletion_manager_tick(owner="test", now=later)
    assert counts["scheduled"] == 1
    run_tasks()
    copy.refresh_from_db()
    assert copy.status == CS.DELETED
    assert statuses(copy) == [
        "deletion_scheduled",
        "deletion_in_progress",
        "deletion_failed",
        "deletion_scheduled",
        "deletion_in_progress",
        "deleted",
    ]
    assert not world.path(copy).exists()


@pytest.mark.django_db
def test_a_failed_deletion_whose_task_is_retried_at_once_goes_back_through_scheduled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.storage.posix import PosixStorage

    world = make_world(tmp_path)
    deletion_manager_tick(owner="test")
    task = DeletionTask.objects.get(physical_copy=world.buffer_copy)
    original = PosixStorage.delete

    def refuse(self: Any, relative_path: str) -> None:
        raise OSError("EIO")

    monkeypatch.setattr(PosixStorage, "delete", refuse)
    with pytest.raises(OSError):
        physical_copy_delete(task.pk, token=task.claim_token, owner="test")
    assert operation_fail(
        DeletionTask, task.pk, token=task.claim_token, message="EIO", actor="t", retryable=True
    )
    monkeypatch.setattr(PosixStorage, "delete", original)
    deletion_manager_tick(owner="test")
    run_tasks()
    copy = PhysicalCopy.objects.get(pk=world.buffer_copy.pk)
    assert copy.status == CS.DELETED
    assert statuses(copy)[-3:] == ["deletion_scheduled", "deletion_in_progress", "deleted"]
    assert DeletionTask.objects.filter(physical_copy=copy).count() == 1


@pytest.mark.django_db
def test_behaviour_16_source_data_waits_for_a_present_verified_archive_copy_and_archived_state(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    source_copy = world.source_copies[0]
    lta = world.lta_copy

    def verdict() -> Any:
        return deletion_verdict(source_copy)

    RawDataPackage.objects.filter(pk=world.package.pk).update(state=PackageState.TRANSFERRING)
    assert verdict().rule == "not_archived"
    RawDataPackage.objects.filter(pk=world.package.pk).update(state=PackageState.ARCHIVED)
    PhysicalCopy.objects.filter(pk=lta.pk).update(integrity=PhysicalCopy.Integrity.MISMATCH)
    assert verdict().rule == "archive_copies"
    assert "not verified (checksum mismatch)" in verdict().reason
    PhysicalCopy.objects.filter(pk=lta.pk).update(
        integrity=PhysicalCopy.Integrity.VERIFIED,
        checksum_verified_at=timezone.now() - timedelta(days=40),
    )
    assert copy_deletion_blocker(source_copy) == (
        f"not deletable: only 0 of 1 required verified archive copies of package "
        f"{world.package.name}; the copy at arc:lta was verified 40 days ago, older than 30 days"
    )
    PhysicalCopy.objects.filter(pk=lta.pk).update(
        checksum_verified_at=timezone.now(), status=CS.DELETION_POSSIBLE
    )
    assert verdict().rule == "archive_copies"
    # Nothing anywhere is scheduled while no archive copy counts.
    assert deletion_manager_tick(owner="test")["scheduled"] == 0
    PhysicalCopy.objects.filter(pk=lta.pk).update(status=CS.PRESENT)
    assert verdict().deletable
    assert copy_deletion_blocker(source_copy).startswith(
        f"deletable: source file copy: {world.package.name} archived, 1 verified archive copy "
        "(1 required), retention of 7 days passed"
    )
    drain()
    assert {c.status for c in PhysicalCopy.objects.filter(location=world.source)} == {CS.DELETED}


@pytest.mark.django_db
def test_behaviour_17_file_copies_become_deletion_possible_once_their_package_copy_there_is_gone(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    # Files unpacked next to their package tar at the archive site's buffer.
    package_here = package_copy(world.package, world.arc_buffer)
    files_here = [file_copy(raw, world.arc_buffer) for raw in world.files]
    for copy in [package_here, *files_here]:
        world.write(copy)
    assert deletion_verdict(files_here[0]).rule == "package_copy_here"
    deletion_manager_tick(owner="test", limit=10)
    task = DeletionTask.objects.get(physical_copy=package_here)
    physical_copy_delete(task.pk, token=task.claim_token, owner="test")
    for copy in files_here:
        copy.refresh_from_db()
        assert copy.status == CS.DELETION_POSSIBLE
        assert statuses(copy) == ["deletion_possible"]
        assert deletion_verdict(copy).deletable
    drain()
    for copy in files_here:
        copy.refresh_from_db()
        assert copy.status == CS.DELETED
        assert statuses(copy) == [
            "deletion_possible",
            "deletion_scheduled",
            "deletion_in_progress",
            "deleted",
        ]
        assert not world.path(copy).exists()


@pytest.mark.django_db
def test_behaviour_18_a_processing_copy_stays_while_an_active_staging_job_references_its_package(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    staged = [file_copy(raw, world.processing, status=CS.STAGED) for raw in world.files]
    for copy in staged:
        world.write(copy)
    job = f.StagingJobFactory(destination_location=world.processing, status=Status.COMPLETED)
    job.raw_data_packages.set([world.package])
    verdict = deletion_verdict(staged[0])
    assert (verdict.rule, verdict.deletable) == ("in_use", False)
    assert f"active staging job {job.pk}" in verdict.reason
    drain()
    assert {c.status for c in PhysicalCopy.objects.filter(location=world.processing)} == {CS.STAGED}
    job.active = False
    job.save(update_fields=["active"])
    drain()
    assert {c.status for c in PhysicalCopy.objects.filter(location=world.processing)} == {
        CS.DELETED
    }
