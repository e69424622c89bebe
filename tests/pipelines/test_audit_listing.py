"""``Storage.list_entries``, the listing the storage audit and the disk monitor stream: the same
objects in the same code-point order as ``list``, each with its size and modification time."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipelines.storage.posix import PosixStorage
from pipelines.storage.s3 import S3Storage
from tests.pipelines.test_storage_contract import moto_endpoint, s3_storage_factory

__all__ = ["moto_endpoint", "s3_storage_factory"]  # fixtures, used by name

FILES = {"b/x.dat": 3, "a-b": 1, "a/b": 5, "a/c/d": 0, "Zed": 2, "é": 4}


def test_posix_entries_have_sizes_and_times_in_the_order_of_list(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path, label="test:disk")
    stamp = time.time() - 7200
    for path, size in FILES.items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x" * size)
        os.utime(target, (stamp, stamp))
    (tmp_path / "a" / ".b.0123.partial").write_bytes(b"half")  # a write in progress

    entries = list(storage.list_entries())

    assert [e.relative_path for e in entries] == list(storage.list()) == sorted(FILES)
    assert {e.relative_path: e.size for e in entries} == FILES
    for entry in entries:
        assert entry.modified_at.tzinfo is not None
        assert abs(entry.modified_at - datetime.fromtimestamp(stamp, tz=UTC)).total_seconds() < 1
    assert [e.relative_path for e in storage.list_entries("a")] == ["a/b", "a/c/d"]


def test_a_file_removed_while_the_directory_is_walked_is_left_out(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path, label="test:disk")
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x")
    listing = storage.list_entries()
    first = next(listing)
    (tmp_path / "b").unlink()  # after the directory was read, before b was looked at
    assert [first.relative_path, *(e.relative_path for e in listing)] == ["a", "c"]


def test_s3_entries_have_sizes_and_times_in_the_order_of_list(
    s3_storage_factory: Callable[..., S3Storage],
) -> None:
    storage = s3_storage_factory()
    before = datetime.now(tz=UTC).replace(microsecond=0)
    for path, size in FILES.items():
        storage.put_stream(path, io.BytesIO(b"x" * size), algorithm="sha256")

    entries = list(storage.list_entries())

    assert [e.relative_path for e in entries] == list(storage.list()) == sorted(FILES)
    assert {e.relative_path: e.size for e in entries} == FILES
    assert all(e.modified_at >= before.replace(second=0) for e in entries)
    assert [e.relative_path for e in storage.list_entries("a")] == ["a/b", "a/c/d"]


@pytest.mark.parametrize("prefix", ["missing", "b/x.dat/.."])
def test_posix_entries_of_a_missing_or_unsafe_prefix(tmp_path: Path, prefix: str) -> None:
    from pipelines.exceptions import UnsafePath

    storage = PosixStorage(tmp_path, label="test:disk")
    if ".." in prefix:
        with pytest.raises(UnsafePath):
            list(storage.list_entries(prefix))
    else:
        assert list(storage.list_entries(prefix)) == []
