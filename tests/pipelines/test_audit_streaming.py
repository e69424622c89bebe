"""The storage audit streams: the listing is pulled a chunk at a time and each chunk costs a
bounded number of queries, however many files the location holds."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from pipelines.models import DarkFile, PhysicalCopy, RawDataPackage
from pipelines.services.audit import AuditReport, audit_storage
from pipelines.storage.base import Storage, StoredObject, storage_for
from tests import factories as f

FILES = 20_000
KNOWN = 2_000
LOST = 5
CHUNK = 500
DARK_FILE_COLUMNS = ["location", "relative_path", "size_bytes", "first_seen_at", "last_seen_at"]


class Counting:
    """Counts how many entries the audit has pulled from the real listing."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.pulled = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list_entries(self, prefix: str = "") -> Iterator[StoredObject]:
        for entry in self.inner.list_entries(prefix):
            self.pulled += 1
            yield entry


def _populate(root: Path, location: Any, *, files: int, known: int, lost: int) -> list[str]:
    """``files`` files in 20 directories, the first ``known`` of them (in path order) with a
    package copy, and ``lost`` more copies whose files do not exist. Returns the lost paths."""
    stamp = time.time() - 3600
    paths = [f"d{n % 20:02d}/f{n:06d}.dat" for n in range(files)]
    for directory in {p.split("/")[0] for p in paths}:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = root / path
        target.write_bytes(b"x")
        os.utime(target, (stamp, stamp))
    scan = f.ExecutedObsUnitFactory()
    module = f.InstrumentModuleFactory()
    lost_paths = [f"lost/l{n}.tar" for n in range(lost)]
    registered = sorted(paths)[:known] + lost_paths
    packages = RawDataPackage.objects.bulk_create(
        RawDataPackage(
            name=f"p{n:06d}.tar",
            relative_path=path,
            executed_obs_unit=scan,
            instrument_module=module,
            size=1,
            file_count=1,
            checksum=f"{n:064x}",
        )
        for n, path in enumerate(registered)
    )
    PhysicalCopy.objects.bulk_create(
        PhysicalCopy(
            kind=PhysicalCopy.Kind.RAW_DATA_PACKAGE,
            raw_data_package=package,
            location=location,
            relative_path=package.relative_path,
        )
        for package in packages
    )
    return lost_paths


@pytest.mark.django_db
def test_an_audit_of_20000_files_pulls_one_chunk_at_a_time_with_bounded_queries_per_chunk(
    tmp_path: Path,
) -> None:
    root = tmp_path / "buffer"
    location = f.DataLocationFactory(root_path=str(root))
    lost_paths = _populate(root, location, files=FILES, known=KNOWN, lost=LOST)
    storage = Counting(storage_for(location))
    ahead: list[int] = []

    def progress(report: AuditReport) -> None:
        # Never more than one chunk pulled beyond what has been compared.
        ahead.append(storage.pulled - report.files_seen)

    with CaptureQueriesContext(connection) as queries:
        report = audit_storage(location, progress=progress, chunk_size=CHUNK, storage=storage)

    chunks = FILES // CHUNK
    assert report.chunks == chunks
    assert (report.files_seen, report.known) == (FILES, KNOWN)
    assert report.dark_new == FILES - KNOWN == DarkFile.objects.count()
    assert sorted(report.lost_paths) == lost_paths
    assert max(ahead) == 0
    # Per chunk: the dark-file lookup and the upsert (one INSERT on PostgreSQL; SQLite's limit
    # on query parameters splits it into batches). Per lost copy: the lock, re-read, move,
    # event and repair of copy_mark_damaged. A few queries before and after, whatever the size.
    batch = connection.ops.bulk_batch_size(DARK_FILE_COLUMNS, [None] * CHUNK) or CHUNK
    per_chunk = 1 + math.ceil(CHUNK / batch)
    per_lost = 12
    assert len(queries) <= per_chunk * chunks + per_lost * LOST + 12, len(queries)

    # A second audit finds the same, now as dark files already recorded.
    again = audit_storage(location, chunk_size=CHUNK)
    assert (again.dark_new, again.dark_still_present, again.lost_marked) == (
        0,
        FILES - KNOWN,
        0,
    )
    assert again.absent_not_marked == LOST  # already MISSING


@pytest.mark.django_db(transaction=True)
def test_the_audit_works_outside_a_transaction_as_the_command_and_the_worker_run_it(
    tmp_path: Path,
) -> None:
    """In autocommit mode PostgreSQL's streamed query is a cursor WITH HOLD, and each mark or
    upsert commits on its own while it is open."""
    root = tmp_path / "buffer"
    location = f.DataLocationFactory(root_path=str(root))
    lost_paths = _populate(root, location, files=300, known=100, lost=3)
    report = audit_storage(location, chunk_size=50)
    assert (report.known, report.dark_new, report.lost_marked) == (100, 200, 3)
    assert sorted(report.lost_paths) == lost_paths
    assert PhysicalCopy.objects.filter(integrity=PhysicalCopy.Integrity.MISSING).count() == 3
