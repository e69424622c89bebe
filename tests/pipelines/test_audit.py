"""The storage audit on disk locations: dark files recorded (never deleted) and dropped once
gone, lost copies marked only after a second look, and the files of live operations left
alone."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from pipelines.models import (
    DarkFile,
    DataLocation,
    PhysicalCopy,
    PhysicalCopyStatus,
    StateEvent,
    Status,
)
from pipelines.services.audit import AuditReport, audit_storage
from pipelines.services.integrity import repair_temp_path
from pipelines.storage.base import Storage, StoredObject, storage_for
from tests import factories as f

pytestmark = pytest.mark.django_db
LT = DataLocation.LocationType
MISSING = PhysicalCopy.Integrity.MISSING
HOUR = 3600


def write(root: Path, relative: str, data: bytes = b"data", *, age: float = HOUR) -> Path:
    """A file ``age`` seconds old (negative: modified in the future, i.e. after the audit's
    start)."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def location_at(root: Path, **fields: Any) -> DataLocation:
    root.mkdir(parents=True, exist_ok=True)
    location: DataLocation = f.DataLocationFactory(root_path=str(root), **fields)
    return location


def copy_at(location: DataLocation, relative: str, **fields: Any) -> PhysicalCopy:
    package = f.RawDataPackageFactory(relative_path=relative)
    copy: PhysicalCopy = f.PhysicalCopyFactory(
        raw_data_package=package, location=location, relative_path=relative, **fields
    )
    return copy


class Omitting:
    """A storage whose listing leaves out some files that are there: as if they had been
    written or renamed into place right after the walk went past them. Everything else goes to
    the real storage; the audit must never delete."""

    def __init__(self, inner: Storage, omit: set[str]) -> None:
        self.inner = inner
        self.omit = omit
        self.exists_calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name in ("delete", "put_stream", "rename"):
            raise AssertionError(f"the audit called {name}: it must only read")
        return getattr(self.inner, name)

    def list_entries(self, prefix: str = "") -> Iterator[StoredObject]:
        return (e for e in self.inner.list_entries(prefix) if e.relative_path not in self.omit)

    def exists(self, relative_path: str) -> bool:
        self.exists_calls.append(relative_path)
        return self.inner.exists(relative_path)


# --- dark files ----------------------------------------------------------------------------------
def test_a_file_no_copy_accounts_for_is_recorded_as_dark_and_left_on_storage(
    tmp_path: Path,
) -> None:
    location = location_at(tmp_path / "buffer")
    root = Path(location.root_path)
    write(root, "packages/known.tar")
    copy_at(location, "packages/known.tar")
    stray = write(root, "stray/unknown.dat", b"x" * 321)

    report = audit_storage(location)

    assert (report.files_seen, report.known, report.dark_new) == (2, 1, 1)
    [dark] = DarkFile.objects.filter(location=location)
    assert (dark.relative_path, dark.size_bytes) == ("stray/unknown.dat", 321)
    assert dark.first_seen_at == dark.last_seen_at == report.started_at
    assert stray.read_bytes() == b"x" * 321


def test_a_dark_file_seen_again_keeps_its_first_sighting_and_is_never_deleted(
    tmp_path: Path,
) -> None:
    location = location_at(tmp_path / "buffer")
    stray = write(Path(location.root_path), "stray.dat", b"abc")
    first = audit_storage(location)
    stray.write_bytes(b"abcdef")
    os.utime(stray, (time.time() - HOUR, time.time() - HOUR))

    second = audit_storage(location)

    assert (second.dark_new, second.dark_still_present, second.dark_gone) == (0, 1, 0)
    dark = DarkFile.objects.get(location=location)
    assert dark.first_seen_at == first.started_at
    assert dark.last_seen_at == second.started_at
    assert dark.size_bytes == 6
    assert stray.exists()


def test_a_dark_file_that_vanished_or_got_a_copy_is_no_longer_recorded(tmp_path: Path) -> None:
    location = location_at(tmp_path / "buffer")
    root = Path(location.root_path)
    f.DarkFileFactory(location=location, relative_path="gone.dat")
    write(root, "registered-since.tar")
    f.DarkFileFactory(location=location, relative_path="registered-since.tar")
    copy_at(location, "registered-since.tar")
    write(root, "still-dark.dat")
    f.DarkFileFactory(location=location, relative_path="still-dark.dat")
    elsewhere = f.DarkFileFactory(relative_path="gone.dat")  # another location's: untouched

    report = audit_storage(location)

    assert report.dark_gone == 2 and report.dark_still_present == 1
    assert list(DarkFile.objects.filter(location=location).values_list("relative_path", flat=True))
    assert set(DarkFile.objects.values_list("pk", flat=True)) == {
        DarkFile.objects.get(location=location, relative_path="still-dark.dat").pk,
        elsewhere.pk,
    }


def test_a_file_registered_while_the_audit_ran_is_not_left_recorded_as_dark(
    tmp_path: Path,
) -> None:
    location = location_at(tmp_path / "buffer")
    write(Path(location.root_path), "raw/late.fits")
    storage = storage_for(location)

    class RegisteringMidway(Omitting):
        def list_entries(self, prefix: str = "") -> Iterator[StoredObject]:
            for entry in self.inner.list_entries(prefix):
                # Ingest registers the file after the copies were queried.
                copy_at(location, "raw/late.fits")
                yield entry

    report = audit_storage(location, storage=RegisteringMidway(storage, set()))

    assert report.dark == 0 and not DarkFile.objects.exists()
    assert not PhysicalCopy.objects.filter(integrity=MISSING).exists()


# --- what the audit leaves alone -----------------------------------------------------------------
def test_temporary_files_new_files_and_run_workspaces_are_not_dark(tmp_path: Path) -> None:
    location = location_at(tmp_path / "processing", location_type=LT.PROCESSING)
    root = Path(location.root_path)
    write(root, "raw/a.fits.tmp")
    write(root, "raw/b.fits.part")
    write(root, "raw/.c.fits.0123456789ab.partial")  # hidden by the POSIX listing itself
    write(root, repair_temp_path("raw/d.fits", 7))  # a repair writing next to its copy
    write(root, "raw/e.fits", age=-HOUR)  # modified after the audit started
    write(root, "pipelines/3/scan-1/17-1/workspace/scratch.bin")
    write(root, "pipelines/3/scan-1/17-1/output/science/cube.fits")
    product = f.DataProductFactory(relative_path="pipelines/3/scan-1/17-1/output/science/c.fits")
    write(root, product.relative_path)
    f.PhysicalCopyFactory(
        kind=PhysicalCopy.Kind.DATA_PRODUCT,
        raw_data_package=None,
        data_product=product,
        location=location,
        relative_path=product.relative_path,
    )
    live = f.StagingJobFactory(destination_location=location, status=Status.IN_PROGRESS)
    done = f.StagingJobFactory(destination_location=location, status=Status.COMPLETED)
    write(root, f"staging/{live.pk}/p.tar")
    write(root, f"staging/{done.pk}/p.tar")  # left behind by a finished job: dark

    report = audit_storage(location)

    assert report.skipped_temporary == 4  # .tmp, .part, .repair-, the live job's tar
    assert report.skipped_new == 1
    assert report.skipped_workspace == 2
    assert report.known == 1
    assert list(DarkFile.objects.values_list("relative_path", flat=True)) == [
        f"staging/{done.pk}/p.tar"
    ]


def test_run_workspaces_are_only_skipped_in_processing_locations(tmp_path: Path) -> None:
    location = location_at(tmp_path / "buffer")
    write(Path(location.root_path), "pipelines/readme.txt")
    report = audit_storage(location)
    assert report.dark_new == 1 and report.skipped_workspace == 0


def test_a_recorded_dark_file_rewritten_during_the_audit_keeps_its_row(tmp_path: Path) -> None:
    location = location_at(tmp_path / "buffer")
    write(Path(location.root_path), "busy.dat", age=-HOUR)
    old = f.DarkFileFactory(
        location=location, relative_path="busy.dat", first_seen_at=timezone.now() - timedelta(1)
    )
    report = audit_storage(location)
    assert (report.skipped_new, report.dark_gone) == (1, 0)
    assert DarkFile.objects.get(pk=old.pk).first_seen_at == old.first_seen_at


# --- lost copies ---------------------------------------------------------------------------------
def test_a_copy_whose_file_is_gone_is_marked_missing_with_an_event_and_a_repair(
    tmp_path: Path,
) -> None:
    location = location_at(tmp_path / "buffer")
    write(Path(location.root_path), "packages/here.tar")
    here = copy_at(location, "packages/here.tar", integrity=PhysicalCopy.Integrity.VERIFIED)
    gone = copy_at(location, "packages/gone.tar", integrity=PhysicalCopy.Integrity.VERIFIED)

    report = audit_storage(location)

    assert (report.lost_marked, report.lost_paths) == (1, ["packages/gone.tar"])
    gone.refresh_from_db()
    here.refresh_from_db()
    assert (gone.integrity, here.integrity) == (MISSING, PhysicalCopy.Integrity.VERIFIED)
    event = StateEvent.objects.for_object(gone).get(field="integrity")
    assert (event.from_state, event.to_state) == ("verified", "missing")
    assert event.actor == "storage-audit" and "not on storage" in event.reason
    assert gone.repairs.exists()  # type: ignore[attr-defined]


def test_a_staged_copy_whose_file_is_gone_is_marked_missing(tmp_path: Path) -> None:
    location = location_at(tmp_path / "processing", location_type=LT.PROCESSING)
    staged = copy_at(location, "raw/x.fits", status=PhysicalCopyStatus.STAGED)
    assert audit_storage(location).lost_marked == 1
    staged.refresh_from_db()
    assert staged.integrity == MISSING


def test_a_file_that_reappears_between_the_listing_and_the_second_look_is_not_lost(
    tmp_path: Path,
) -> None:
    location = location_at(tmp_path / "buffer")
    write(Path(location.root_path), "packages/renamed-in-late.tar")
    copy = copy_at(location, "packages/renamed-in-late.tar")
    storage = Omitting(storage_for(location), {"packages/renamed-in-late.tar"})

    report = audit_storage(location, storage=storage)

    assert (report.lost_marked, report.lost_reappeared) == (0, 1)
    assert storage.exists_calls == ["packages/renamed-in-late.tar"]
    copy.refresh_from_db()
    assert copy.integrity != MISSING
    assert not StateEvent.objects.for_object(copy).filter(field="integrity").exists()


def test_copies_being_deleted_already_missing_or_newer_than_the_audit_are_never_marked(
    tmp_path: Path,
) -> None:
    location = location_at(tmp_path / "buffer")
    untouched = [
        copy_at(location, "a.tar", status=PhysicalCopyStatus.DELETION_IN_PROGRESS),
        copy_at(location, "b.tar", status=PhysicalCopyStatus.DELETION_SCHEDULED),
        copy_at(location, "c.tar", status=PhysicalCopyStatus.DELETION_FAILED),
        copy_at(location, "d.tar", status=PhysicalCopyStatus.DELETION_POSSIBLE),
        copy_at(location, "e.tar", integrity=MISSING),
        copy_at(location, "f.tar"),
    ]
    # Registered after the audit's start (the clock of whoever registered it ran ahead).
    PhysicalCopy.objects.filter(pk=untouched[-1].pk).update(
        created_at=timezone.now() + timedelta(hours=1)
    )
    storage = Omitting(storage_for(location), set())

    report = audit_storage(location, storage=storage)

    assert (report.lost_marked, report.absent_not_marked) == (0, 6)
    assert storage.exists_calls == []
    before = {c.pk: (c.status, c.integrity) for c in untouched}
    after = {
        c.pk: (c.status, c.integrity)
        for c in PhysicalCopy.objects.filter(pk__in=[c.pk for c in untouched])
    }
    assert after == before


def test_an_unreachable_location_stops_the_audit_before_anything_is_marked(
    tmp_path: Path,
) -> None:
    location = f.DataLocationFactory(root_path=str(tmp_path / "not-mounted"))
    copy = copy_at(location, "packages/p.tar")
    from pipelines.exceptions import StorageUnavailable

    with pytest.raises(StorageUnavailable, match="not mounted"):
        audit_storage(location)
    copy.refresh_from_db()
    assert copy.integrity != MISSING and not DarkFile.objects.exists()


# --- order ---------------------------------------------------------------------------------------
def test_the_listing_and_the_database_are_merged_in_the_same_order_whatever_the_names(
    tmp_path: Path,
) -> None:
    """Names whose order differs between code points and natural-language collations (case,
    punctuation, "/" against "-" and ".", accents, digits)."""
    location = location_at(tmp_path / "buffer")
    root = Path(location.root_path)
    names = [
        "a-b/x",
        "a.b",
        "a/b",
        "a/b-c",
        "a/b.c",
        "a/bc/d",
        "A",
        "B/é.fits",
        "B/e.fits",
        "B/f.fits",
        "z10",
        "z9",
        "Zürich/1",
        "_x",
        "~y",
    ]
    for name in names:
        write(root, name)
        copy_at(location, name)
    write(root, "a/b-b")  # dark, between known names

    report = audit_storage(location, chunk_size=3)

    assert (report.known, report.dark_new, report.lost_marked) == (len(names), 1, 0)
    assert report.absent_not_marked == 0
    assert list(DarkFile.objects.values_list("relative_path", flat=True)) == ["a/b-b"]


def test_progress_is_reported_after_every_chunk(tmp_path: Path) -> None:
    location = location_at(tmp_path / "buffer")
    for n in range(7):
        write(Path(location.root_path), f"f{n}")
    seen: list[int] = []

    def progress(report: AuditReport) -> None:
        seen.append(report.files_seen)

    audit_storage(location, progress=progress, chunk_size=3)
    assert seen == [3, 6, 7, 7]
