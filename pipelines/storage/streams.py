"""File objects that hash what passes through them, so a copy or a tar is checksummed while it is
written and each source file is verified while it is read: one pass over the bytes, never two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from .checksums import Hasher, new_hasher


class HashingReader:
    """Wraps a binary file opened for reading; hashes and counts every byte read through it.

    ``on_chunk`` is called after every read (e.g. to stop when a lease is lost); it may raise.
    """

    def __init__(
        self, raw: BinaryIO, algorithm: str, on_chunk: Callable[[], None] | None = None
    ) -> None:
        self._raw = raw
        self._hasher: Hasher = new_hasher(algorithm)
        self._on_chunk = on_chunk
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._hasher.update(data)
            self.size += len(data)
        if self._on_chunk is not None:
            self._on_chunk()
        return data

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self._hasher.update(memoryview(buffer)[:count])
            self.size += count
        if self._on_chunk is not None:
            self._on_chunk()
        return count or 0

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class HashingWriter:
    """Wraps a binary file opened for writing; hashes and counts every byte written."""

    def __init__(self, raw: BinaryIO, algorithm: str) -> None:
        self._raw = raw
        self._hasher: Hasher = new_hasher(algorithm)
        self.size = 0

    def write(self, data: Any) -> int:
        written = self._raw.write(data)
        self._hasher.update(data)
        self.size += len(data)
        return written if written is not None else len(data)

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()
