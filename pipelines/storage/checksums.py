"""Checksums of files and bytes, by algorithm name.

The algorithm names are the values of ``DataLocation.ChecksumAlgorithm`` and
``RawDataFile.checksum_algorithm``; every registered checksum and every verification after a
copy goes through this module, so two sides always hash the same way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, Protocol

import xxhash


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


# Literal registry: algorithm name -> (constructor, length of the hex digest). The hex length
# lets ingest reject a malformed checksum before any file is read.
ALGORITHMS: dict[str, tuple[Callable[[], Hasher], int]] = {
    "sha256": (hashlib.sha256, 64),
    "xxh3_128": (xxhash.xxh3_128, 32),
}

# Large reads keep the per-call overhead negligible next to the hashing itself (sha256 is
# benchmarked against `openssl dgst`, xxh3 must reach several GB/s from page cache).
CHUNK_SIZE = 4 * 1024 * 1024

_HEX = frozenset("0123456789abcdef")


def _entry(algorithm: str) -> tuple[Callable[[], Hasher], int]:
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {known})") from None


def new_hasher(algorithm: str) -> Hasher:
    """A fresh incremental hasher, for callers that hash while they copy."""
    return _entry(algorithm)[0]()


def hex_length(algorithm: str) -> int:
    """Number of hex characters in a digest of ``algorithm``."""
    return _entry(algorithm)[1]


def is_valid_hex_digest(value: str, algorithm: str) -> bool:
    """True when ``value`` is a lowercase hex digest of the right length for ``algorithm``."""
    return len(value) == hex_length(algorithm) and set(value) <= _HEX


def checksum_bytes(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    """Hex digest of ``data``."""
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def checksum_and_size(
    path: str | os.PathLike[str], algorithm: str = "sha256", *, chunk_size: int = CHUNK_SIZE
) -> tuple[str, int]:
    """Hex digest of the file at ``path`` and the number of bytes hashed.

    Streams the file through one reused buffer (no allocation per chunk, no Python-level
    buffering on top of it), so memory stays at ``chunk_size`` whatever the file size. The size
    is what was actually read, not what ``stat`` said before reading.
    """
    hasher = new_hasher(algorithm)
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            read = handle.readinto(view)
            if not read:
                break
            hasher.update(view[:read])
            total += read
    return hasher.hexdigest(), total


def checksum_file(
    path: str | os.PathLike[str], algorithm: str = "sha256", *, chunk_size: int = CHUNK_SIZE
) -> str:
    """Hex digest of the file at ``path`` (see ``checksum_and_size``)."""
    return checksum_and_size(path, algorithm, chunk_size=chunk_size)[0]
