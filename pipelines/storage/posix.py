"""Disk locations: files below ``DataLocation.root_path`` on a file system this worker mounts.

Writes go to a hidden temporary name in the destination directory, are fsynced, renamed over
the final name and the directory is fsynced, so a crash leaves either the old file, the new one
or a temporary file (never listed, removed by the write that failed when it can), never a torn
file under the real name.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from pipelines.exceptions import NonRetryableError, StorageUnavailable

from .base import ObjectNotFound, Reader, Storage, StoredObject, iter_chunks, location_label
from .checksums import CHUNK_SIZE, new_hasher
from .paths import normalize_relative_path, safe_join

if TYPE_CHECKING:
    from pipelines.models import DataLocation

# Temporary files are ".<name>.<random>.partial" next to their final name; list() skips them.
_TEMP_SUFFIX = ".partial"

# The file is full or read-only for now: space can be freed, a remount fixed; worth a retry.
_RETRYABLE_WRITE = {errno.ENOSPC: "no space left", errno.EROFS: "read-only file system"}
if hasattr(errno, "EDQUOT"):
    _RETRYABLE_WRITE[errno.EDQUOT] = "disk quota exceeded"


class PosixStorage(Storage):
    def __init__(self, root: str | os.PathLike[str], *, label: str = "") -> None:
        if not os.fspath(root):
            raise NonRetryableError(f"{label or 'disk location'}: root_path is empty")
        self.root = Path(root)
        self.label = label or os.fspath(root)

    @classmethod
    def from_location(cls, location: DataLocation) -> PosixStorage:
        return cls(location.root_path, label=location_label(location))

    def __repr__(self) -> str:
        return f"PosixStorage({self.label}, root={os.fspath(self.root)!r})"

    # -- paths and errors ---------------------------------------------------------------------

    def _path(self, relative_path: str) -> Path:
        return safe_join(self.root, relative_path)

    def _require_root(self) -> None:
        """A missing root is a missing mount, not an empty location: never answer "not there"
        (the audit and the deletion manager act on that answer) and never create it."""
        if not self.root.is_dir():
            raise StorageUnavailable(
                f"{self.label}: root {os.fspath(self.root)!r} is not a directory (not mounted?)"
            )

    def _raise(self, exc: OSError, action: str, relative_path: str) -> NoReturn:
        where = f"{self.label}: cannot {action} {relative_path!r}"
        code = exc.errno
        if code in _RETRYABLE_WRITE:
            raise StorageUnavailable(f"{where}: {_RETRYABLE_WRITE[code]} ({exc.strerror})") from exc
        if code == errno.ENOENT:
            self._require_root()
            raise ObjectNotFound(f"{where}: no such file") from exc
        if code in (errno.EACCES, errno.EPERM):
            raise NonRetryableError(
                f"{where}: permission denied for the worker's user ({exc.strerror})"
            ) from exc
        if code == errno.EFBIG:
            # RLIMIT_FSIZE or the file system's own maximum: the same write fails again.
            raise NonRetryableError(f"{where}: file too large for this location") from exc
        if code in (errno.ENOTDIR, errno.EISDIR):
            raise NonRetryableError(f"{where}: {exc.strerror}") from exc
        # EIO, ESTALE, ETIMEDOUT...: a sick mount or a network file system; try again later.
        raise StorageUnavailable(f"{where}: {exc.strerror or exc}") from exc

    # -- writing ------------------------------------------------------------------------------

    def put_stream(self, relative_path: str, reader: Reader, *, algorithm: str) -> tuple[str, int]:
        target = self._path(relative_path)
        hasher = new_hasher(algorithm)
        self._require_root()
        temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        total = 0
        try:
            # Parents below the root only: the root itself was checked above.
            target.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(temp, flags, 0o644)
            try:
                with open(fd, "wb", buffering=0, closefd=False) as out:
                    for chunk in iter_chunks(reader, CHUNK_SIZE):
                        hasher.update(chunk)
                        _write_all(out, chunk)
                        total += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target)
            _fsync_directory(target.parent)
        except BaseException as exc:
            _remove_quietly(temp)
            if isinstance(exc, OSError):
                self._raise(exc, "write", relative_path)
            raise
        return hasher.hexdigest(), total

    # -- reading ------------------------------------------------------------------------------

    @contextmanager
    def get_stream(self, relative_path: str) -> Iterator[_SourceReader]:
        path = self._path(relative_path)
        try:
            # Unbuffered: iter_chunks reads straight into its own 4 MiB buffer.
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
        except OSError as exc:
            self._raise(exc, "read", relative_path)
        with handle:
            yield _SourceReader(handle, self, relative_path)

    def exists(self, relative_path: str) -> bool:
        path = self._path(relative_path)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            self._require_root()
            return False
        except OSError as exc:
            self._raise(exc, "look up", relative_path)
        return stat.S_ISREG(mode)

    def size(self, relative_path: str) -> int:
        path = self._path(relative_path)
        try:
            info = path.stat()
        except OSError as exc:
            self._raise(exc, "look up", relative_path)
        if not stat.S_ISREG(info.st_mode):
            raise ObjectNotFound(f"{self.label}: {relative_path!r} is not a file")
        return info.st_size

    def rename(self, source_path: str, target_path: str) -> None:
        source = self._path(source_path)
        target = self._path(target_path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        except OSError as exc:
            self._raise(exc, "rename", source_path)
        _fsync_directory(target.parent)
        if source.parent != target.parent:
            _fsync_directory(source.parent)

    def delete(self, relative_path: str) -> None:
        path = self._path(relative_path)
        try:
            path.unlink()
        except FileNotFoundError:
            self._require_root()
            return
        except OSError as exc:
            self._raise(exc, "delete", relative_path)
        _fsync_directory(path.parent)

    def list(self, prefix: str = "") -> Iterator[str]:
        for relative_path, _entry in self._entries(prefix):
            yield relative_path

    def list_entries(self, prefix: str = "") -> Iterator[StoredObject]:
        for relative_path, entry in self._entries(prefix):
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the directory was read: not there any more
            except OSError as exc:
                self._raise(exc, "look up", relative_path)
            yield StoredObject(
                relative_path,
                info.st_size,
                datetime.fromtimestamp(info.st_mtime, tz=UTC),
            )

    def _entries(self, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        self._require_root()
        if prefix:
            start = normalize_relative_path(prefix)
            directory = safe_join(self.root, start)
            if not directory.is_dir():
                return
            yield from self._walk(directory, start + "/")
        else:
            yield from self._walk(self.root, "")

    def _walk(
        self, directory: Path, relative_prefix: str
    ) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """(relative path, directory entry) of the files below ``directory`` in code-point order
        of their relative path: a directory sorts as its name plus "/", which is exactly where
        its files fall in that order. Symbolic links are neither listed nor followed (they could
        lead outside the root). Holds the entries of one directory per level at a time."""
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError as exc:
            self._raise(exc, "list", relative_prefix or ".")
        keyed = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                keyed.append((entry.name + "/", entry))
            elif entry.is_file(follow_symlinks=False):
                if entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX):
                    continue
                keyed.append((entry.name, entry))
        del entries
        keyed.sort(key=lambda item: item[0])
        for key, entry in keyed:
            if key.endswith("/"):
                yield from self._walk(Path(entry.path), relative_prefix + key)
            else:
                yield relative_prefix + key, entry

    def free_bytes(self) -> int | None:
        self._require_root()
        try:
            vfs = os.statvfs(self.root)
        except OSError as exc:
            self._raise(exc, "measure", ".")
        return vfs.f_bavail * vfs.f_frsize

    def filesystem_usage(self) -> tuple[int, int]:
        """``(used, free)`` bytes of the whole file system the root lives on, as ``df`` counts
        them: used = all blocks minus the free ones, free = what an unprivileged writer may
        still use (blocks reserved for root are neither). The disk monitor's measurement."""
        self._require_root()
        try:
            vfs = os.statvfs(self.root)
        except OSError as exc:
            self._raise(exc, "measure", ".")
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        return used, vfs.f_bavail * vfs.f_frsize


def _write_all(out: BinaryIO, chunk: memoryview) -> None:
    """An unbuffered write may take fewer bytes than offered (signals, pipes, some NFS)."""
    offset = 0
    while offset < len(chunk):
        written = out.write(chunk[offset:])
        if written is None:  # non-blocking file: not expected here, but never spin silently
            raise OSError(errno.EAGAIN, "write would block")
        offset += written


def _fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    # If it cannot go, leave it: list() skips temporary files and the next write uses a new name.
    with suppress(OSError):
        path.unlink()


class _SourceReader:
    """A file being read, whose errors name the source location: during a copy the destination
    must not be blamed for (or retried because of) a failing source disk."""

    def __init__(self, handle: BinaryIO, storage: PosixStorage, relative_path: str) -> None:
        self._handle = handle
        self._storage = storage
        self._relative_path = relative_path

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._handle.read(n)
        except OSError as exc:
            self._storage._raise(exc, "read", self._relative_path)

    def readinto(self, buffer: Any, /) -> int:
        try:
            return self._handle.readinto(buffer) or 0  # type: ignore[attr-defined]
        except OSError as exc:
            self._storage._raise(exc, "read", self._relative_path)
