"""Disk locations beyond the shared contract: the registry, durability, errors of a full,
read-only or missing disk, symlinks, and what list() leaves out."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pipelines.exceptions import NonRetryableError, StorageUnavailable, UnsafePath, is_retryable
from pipelines.storage import posix
from pipelines.storage.base import STORAGES, ObjectNotFound, storage_class, storage_for
from pipelines.storage.posix import PosixStorage
from tests.factories import DataLocationFactory, SiteFactory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def storage(tmp_path: Path) -> PosixStorage:
    root = tmp_path / "buffer"
    root.mkdir()
    return PosixStorage(root, label="ccat:buffer")


def _put(storage: PosixStorage, path: str, data: bytes) -> tuple[str, int]:
    return storage.put_stream(path, io.BytesIO(data), algorithm="sha256")


# --- the registry --------------------------------------------------------------------------------
def test_the_registry_covers_disk_and_s3_and_imports_lazily() -> None:
    assert STORAGES == {
        "disk": "pipelines.storage.posix.PosixStorage",
        "s3": "pipelines.storage.s3.S3Storage",
    }
    assert storage_class("disk") is PosixStorage


@pytest.mark.django_db
def test_storage_for_a_disk_location_uses_its_root_and_names_it(tmp_path: Path) -> None:
    location = DataLocationFactory(
        site=SiteFactory(short_name="cologne"), name="buffer", root_path=str(tmp_path)
    )
    storage = storage_for(location)
    assert isinstance(storage, PosixStorage)
    assert storage.root == tmp_path
    assert storage.label == "cologne:buffer"


@pytest.mark.django_db
def test_storage_for_a_tape_location_is_a_clear_permanent_error() -> None:
    location = DataLocationFactory(
        site=SiteFactory(short_name="cologne"), name="tape", storage_type="tape"
    )
    with pytest.raises(
        NonRetryableError, match="cologne:tape: storage type 'tape' is not supported"
    ):
        storage_for(location)


# --- durability and temporary files --------------------------------------------------------------
def test_put_fsyncs_the_file_and_its_directory(
    storage: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(posix.os, "fsync", recording_fsync)
    _put(storage, "pkg/a.tar", b"data")
    assert synced == ["file", "dir"]


def test_the_temporary_file_is_hidden_next_to_the_target_and_never_listed(
    storage: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real_replace = os.replace

    def replace_and_look(src: Any, dst: Any) -> None:
        seen.append(sorted(os.listdir(Path(src).parent)))
        seen.append(list(storage.list()))
        real_replace(src, dst)

    monkeypatch.setattr(posix.os, "replace", replace_and_look)
    _put(storage, "pkg/a.tar", b"data")

    [temporary] = seen[0]
    assert temporary.startswith(".a.tar.") and temporary.endswith(".partial")
    assert seen[1] == []  # mid-write, nothing is visible to the audit
    assert list(storage.list()) == ["pkg/a.tar"]


# --- errors of the disk --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "error", "words"),
    [
        (errno.ENOSPC, StorageUnavailable, "no space left"),
        (errno.EDQUOT, StorageUnavailable, "disk quota exceeded"),
        (errno.EROFS, StorageUnavailable, "read-only file system"),
        (errno.EACCES, NonRetryableError, "permission denied"),
        (errno.EIO, StorageUnavailable, "Input/output error"),
    ],
    ids=["ENOSPC", "EDQUOT", "EROFS", "EACCES", "EIO"],
)
def test_a_failed_write_is_a_clear_error_naming_the_location_and_leaves_nothing(
    storage: PosixStorage, monkeypatch: pytest.MonkeyPatch, code: int, error: type, words: str
) -> None:
    _put(storage, "pkg/a.tar", b"previous")
    real_write_all = posix._write_all

    def write_half_then_fail(out: Any, chunk: memoryview) -> None:
        real_write_all(out, chunk[: len(chunk) // 2])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(posix, "_write_all", write_half_then_fail)
    with pytest.raises(error, match=words) as caught:
        _put(storage, "pkg/a.tar", b"new bytes that do not fit")

    assert "ccat:buffer" in str(caught.value) and "pkg/a.tar" in str(caught.value)
    assert is_retryable(caught.value) == (error is StorageUnavailable)
    monkeypatch.undo()
    assert sorted(os.listdir(storage.root / "pkg")) == ["a.tar"]
    assert (storage.root / "pkg" / "a.tar").read_bytes() == b"previous"


_FILE_SIZE_LIMIT_SCRIPT = textwrap.dedent(
    """
    import io, json, os, resource, signal, sys
    from pipelines.storage.posix import PosixStorage

    root = sys.argv[1]
    # Past the limit the kernel sends SIGXFSZ (fatal by default); ignored, write() gets EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, resource.RLIM_INFINITY))
    storage = PosixStorage(root, label="ccat:buffer")
    try:
        storage.put_stream("pkg/big.tar", io.BytesIO(b"x" * (3 * 1024 * 1024)), algorithm="sha256")
        outcome = {"error": None}
    except Exception as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc), "retryable": exc.retryable}
    outcome["left"] = sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )
    print(json.dumps(outcome))
    """
)


def test_a_real_file_size_limit_fails_the_write_cleanly(storage: PosixStorage) -> None:
    """The kernel's own refusal (RLIMIT_FSIZE in a child process), not a simulated errno."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT_SCRIPT, str(storage.root)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=True,
    )
    outcome = json.loads(done.stdout)
    assert outcome["error"] == "NonRetryableError", outcome
    assert "ccat:buffer" in outcome["message"] and "too large" in outcome["message"]
    assert outcome["left"] == []


def test_a_missing_root_is_unavailable_not_empty_and_is_never_created(tmp_path: Path) -> None:
    """An unmounted disk must not read as "every file is gone" (the audit and the deletion
    manager act on that), nor be filled in on the disk underneath the mount point."""
    root = tmp_path / "mnt" / "buffer"
    storage = PosixStorage(root, label="ccat:buffer")
    for call in (
        lambda: storage.exists("a.tar"),
        lambda: list(storage.list()),
        lambda: storage.delete("a.tar"),
        lambda: storage.size("a.tar"),
        lambda: storage.free_bytes(),
        lambda: _put(storage, "pkg/a.tar", b"x"),
    ):
        with pytest.raises(StorageUnavailable, match=r"ccat:buffer: .*not mounted"):
            call()
    assert not root.exists()


def test_deleting_a_directory_is_refused(storage: PosixStorage) -> None:
    _put(storage, "pkg/a.tar", b"x")
    with pytest.raises(NonRetryableError):
        storage.delete("pkg")
    assert (storage.root / "pkg" / "a.tar").exists()
    assert not storage.exists("pkg")
    with pytest.raises(ObjectNotFound, match="is not a file"):
        storage.size("pkg")


# --- symlinks ------------------------------------------------------------------------------------
def test_a_symlink_out_of_the_root_is_refused(storage: PosixStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    (storage.root / "link").symlink_to(outside)

    with pytest.raises(UnsafePath):
        _put(storage, "link/planted", b"x")
    with pytest.raises(UnsafePath):
        storage.checksum("link/secret", "sha256")
    with pytest.raises(UnsafePath):
        storage.delete("link/secret")
    assert sorted(os.listdir(outside)) == ["secret"]


def test_list_neither_shows_nor_follows_symlinks(storage: PosixStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "elsewhere.bin").write_bytes(b"x")
    (storage.root / "dirlink").symlink_to(outside)
    _put(storage, "real.bin", b"x")
    (storage.root / "filelink").symlink_to(storage.root / "real.bin")

    assert list(storage.list()) == ["real.bin"]


# --- capacity ------------------------------------------------------------------------------------
def test_free_bytes_is_what_the_file_system_reports(storage: PosixStorage) -> None:
    free = storage.free_bytes()
    assert isinstance(free, int)
    assert abs(free - shutil.disk_usage(storage.root).free) < 64 * 1024 * 1024
