"""One interface for every storage type, the registry of storage types, and the copy between
any two of them.

Workers never touch a disk path or an S3 key directly: they ask ``storage_for(location)`` and
use the methods of ``Storage``. Every relative path goes through ``pipelines.storage.paths``
inside the backend (SPEC §8: paths never escape their location's root), and every write hashes
the bytes as they go out, so a copy is read once (SPEC §9: copy with checksum at 0.9 of ``cp``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.exceptions import NonRetryableError

from .checksums import CHUNK_SIZE, new_hasher

if TYPE_CHECKING:
    from pipelines.models import DataLocation


class Reader(Protocol):
    """What ``put_stream`` reads from: a binary file object (``readinto`` is used when present,
    so a plain unbuffered file is read without a copy per chunk)."""

    def read(self, n: int = -1, /) -> bytes: ...


class ObjectNotFound(NonRetryableError):
    """The path names no object at a location that is itself reachable. (An unreachable
    location raises ``StorageUnavailable`` instead, so a lost mount never reads as "missing".)"""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One stored object as a listing sees it: its relative path, its size in bytes and when it
    was last modified (timezone-aware, UTC)."""

    relative_path: str
    size: int
    modified_at: datetime


class Storage(abc.ABC):
    """The files of one ``DataLocation``. Relative paths are POSIX style, below the location root
    (or below the S3 prefix); a path that could leave it raises ``UnsafePath``.

    Errors: ``StorageUnavailable`` (retryable: unreachable, full, read-only, throttled),
    ``NonRetryableError`` (permission denied, missing configuration or credentials),
    ``ObjectNotFound`` (a read of something that is not there). Messages name the location.
    """

    #: "site:location", used in every error message.
    label: str

    @classmethod
    @abc.abstractmethod
    def from_location(cls, location: DataLocation) -> Storage:
        """The storage of ``location``; NonRetryableError when its configuration is incomplete."""

    @abc.abstractmethod
    def put_stream(self, relative_path: str, reader: Reader, *, algorithm: str) -> tuple[str, int]:
        """Store everything ``reader`` yields at ``relative_path``, replacing any object there.

        Returns ``(hex checksum, size)`` of the bytes written, hashed as they were written.
        Atomic: until it returns, readers see the old object or none; on any failure (including
        one raised by ``reader``) nothing new is visible and no temporary object is left behind.
        """

    @abc.abstractmethod
    def get_stream(self, relative_path: str) -> AbstractContextManager[Any]:
        """A context manager yielding a binary reader (``read(n)``) of the stored bytes."""

    def checksum(self, relative_path: str, algorithm: str) -> tuple[str, int]:
        """``(hex checksum, size)`` of the bytes as stored now, read back in full: this is the
        destination check after a copy, so it never trusts what the writer reported."""
        hasher = new_hasher(algorithm)
        total = 0
        with self.get_stream(relative_path) as reader:
            for chunk in iter_chunks(reader):
                hasher.update(chunk)
                total += len(chunk)
        return hasher.hexdigest(), total

    @abc.abstractmethod
    def exists(self, relative_path: str) -> bool:
        """True when an object is stored at ``relative_path``. Raises ``StorageUnavailable``
        rather than answering False when the location itself cannot be reached."""

    @abc.abstractmethod
    def size(self, relative_path: str) -> int:
        """Size in bytes of the stored object; ``ObjectNotFound`` when there is none."""

    @abc.abstractmethod
    def rename(self, source_path: str, target_path: str) -> None:
        """Move the object at ``source_path`` to ``target_path``, replacing any object there.

        Atomic for readers of ``target_path``: they see the old object or the new one, never a
        mix (POSIX rename; on S3 a server-side copy, then the source is removed). A repair uses
        it to put verified bytes over a damaged copy. ``ObjectNotFound`` when ``source_path``
        is not there."""

    @abc.abstractmethod
    def delete(self, relative_path: str) -> None:
        """Remove the object. Idempotent: deleting what is not there succeeds."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Relative paths of every stored object below the directory ``prefix`` ("" = all),
        in code-point order of the full relative path (the order S3 lists keys in), so a
        storage audit can merge the listing with an ordered query. Temporary files of writes
        in progress are not listed."""

    @abc.abstractmethod
    def list_entries(self, prefix: str = "") -> Iterator[StoredObject]:
        """Like ``list`` (same objects, same order, temporary files of writes in progress left
        out), with each object's size and modification time, streamed: memory does not grow with
        the number of objects (POSIX holds one directory's entries at a time, S3 one page). An
        object that vanishes between being seen and being looked at is left out."""

    @abc.abstractmethod
    def free_bytes(self) -> int | None:
        """Bytes still available for writing, or None where the storage cannot say (S3)."""


def iter_chunks(reader: Reader, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """The bytes of ``reader`` as views of one reused buffer of ``chunk_size``.

    Each chunk is full except the last (short reads from pipes and sockets are topped up), and
    is only valid until the next one is produced: consume it (hash, write) before moving on.
    """
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    readinto = getattr(reader, "readinto", None)
    while True:
        filled = 0
        while filled < chunk_size:
            if readinto is not None:
                count = readinto(view[filled:])
            else:
                data = reader.read(chunk_size - filled)
                count = len(data)
                view[filled : filled + count] = data
            if not count:
                break
            filled += count
        if filled:
            yield view[:filled]
        if filled < chunk_size:
            return


def copy(
    source: Storage, source_path: str, dest: Storage, dest_path: str, *, algorithm: str
) -> tuple[str, int]:
    """Stream ``source_path`` of ``source`` to ``dest_path`` of ``dest`` in one pass.

    Returns ``(hex checksum, size)`` of the bytes that went through, hashed while copying; the
    caller compares them with the registered checksum. The write is atomic on ``dest`` (see
    ``Storage.put_stream``). To prove what landed, call ``dest.checksum`` afterwards.
    """
    with source.get_stream(source_path) as reader:
        return dest.put_stream(dest_path, reader, algorithm=algorithm)


# Literal registry: DataLocation.storage_type -> dotted path of the Storage class, imported on
# first use (boto3 is only imported by workers that serve an S3 location).
STORAGES: dict[str, str] = {
    "disk": "pipelines.storage.posix.PosixStorage",
    "s3": "pipelines.storage.s3.S3Storage",
}


@cache
def storage_class(storage_type: str) -> type[Storage]:
    """The Storage class registered for ``storage_type``; NonRetryableError when there is none
    (tape, until a tape backend exists)."""
    try:
        dotted = STORAGES[storage_type]
    except KeyError:
        known = ", ".join(sorted(STORAGES))
        raise NonRetryableError(
            f"storage type {storage_type!r} is not supported yet (supported: {known})"
        ) from None
    module_path, _, name = dotted.rpartition(".")
    cls: type[Storage] = getattr(import_module(module_path), name)
    return cls


def storage_for(location: DataLocation) -> Storage:
    """A Storage for ``location``, built from its fields (and, for S3, from the environment).
    Cheap enough to call per task; nothing is cached across locations."""
    try:
        cls = storage_class(location.storage_type)
    except NonRetryableError as exc:
        raise NonRetryableError(f"{location_label(location)}: {exc}") from None
    return cls.from_location(location)


def location_label(location: DataLocation) -> str:
    """The location as every storage error names it: ``site:location``."""
    return f"{location.site.short_name}:{location.name}"
