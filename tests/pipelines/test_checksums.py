"""Checksums match the reference implementations; safe_join keeps paths inside their root."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import xxhash

from pipelines.exceptions import UnsafePath
from pipelines.storage import checksums
from pipelines.storage.paths import normalize_relative_path, safe_join


def _write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize(
    "size",
    [0, 1, 1000, checksums.CHUNK_SIZE, checksums.CHUNK_SIZE + 12_345],
    ids=["empty", "one-byte", "small", "exactly-one-chunk", "more-than-one-chunk"],
)
def test_checksum_file_equals_the_reference_digests(tmp_path: Path, size: int) -> None:
    path = tmp_path / "raw.bin"
    data = _write(path, size)

    assert checksums.checksum_file(path) == hashlib.sha256(data).hexdigest()
    assert checksums.checksum_file(path, "sha256") == hashlib.sha256(data).hexdigest()
    assert checksums.checksum_file(path, "xxh3_128") == xxhash.xxh3_128(data).hexdigest()
    assert checksums.checksum_and_size(path, "xxh3_128") == (
        xxhash.xxh3_128(data).hexdigest(),
        size,
    )


def test_small_chunks_give_the_same_digest_as_one_read(tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    data = _write(path, 10_001)

    digest = checksums.checksum_file(path, "sha256", chunk_size=7)

    assert digest == hashlib.sha256(data).hexdigest()


def test_checksum_bytes_equals_the_reference_digests() -> None:
    data = b"FYST CHAI LFA spectrum"

    assert checksums.checksum_bytes(data) == hashlib.sha256(data).hexdigest()
    assert checksums.checksum_bytes(data, "xxh3_128") == xxhash.xxh3_128(data).hexdigest()
    assert checksums.checksum_bytes(b"", "sha256") == hashlib.sha256(b"").hexdigest()


def test_unknown_algorithm_is_a_clear_value_error(tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    path.write_bytes(b"x")

    with pytest.raises(ValueError, match=r"unknown checksum algorithm 'md5' \(known: sha256"):
        checksums.checksum_file(path, "md5")
    with pytest.raises(ValueError, match="unknown checksum algorithm 'crc32'"):
        checksums.checksum_bytes(b"x", "crc32")


def test_registry_matches_the_algorithms_a_location_may_choose() -> None:
    from pipelines.models import DataLocation

    assert set(checksums.ALGORITHMS) == set(DataLocation.ChecksumAlgorithm.values)
    for algorithm in checksums.ALGORITHMS:
        assert len(checksums.checksum_bytes(b"x", algorithm)) == checksums.hex_length(algorithm)


def test_hex_digest_validation() -> None:
    sha = hashlib.sha256(b"x").hexdigest()

    assert checksums.is_valid_hex_digest(sha, "sha256")
    assert not checksums.is_valid_hex_digest(sha[:-1], "sha256")
    assert not checksums.is_valid_hex_digest(sha.upper(), "sha256")
    assert not checksums.is_valid_hex_digest("g" * 64, "sha256")
    assert not checksums.is_valid_hex_digest(sha, "xxh3_128")


# --- safe_join ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("../etc/passwd", r"contains '\.\.'"),
        ("a/../../outside", r"contains '\.\.'"),
        ("a/b/..", r"contains '\.\.'"),
        ("/etc/passwd", "is absolute"),
        ("a/b\x00c", "NUL byte"),
        ("", "empty"),
        ("   ", "empty"),
        (".", "names the location root"),
        ("./", "names the location root"),
    ],
)
def test_safe_join_rejects_unsafe_paths(tmp_path: Path, relative: str, message: str) -> None:
    with pytest.raises(UnsafePath, match=message):
        safe_join(tmp_path, relative)


def test_safe_join_accepts_nested_paths_and_normalises_them(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "20250106/scan/lfa/lfa_0001.fits") == (
        tmp_path / "20250106" / "scan" / "lfa" / "lfa_0001.fits"
    )
    assert safe_join(tmp_path, "./a//b/./c.fits") == tmp_path / "a" / "b" / "c.fits"
    assert normalize_relative_path("./a//b/./c.fits/") == "a/b/c.fits"
    # A name that merely starts with dots is an ordinary file name.
    assert safe_join(tmp_path, "a/..hidden") == tmp_path / "a" / "..hidden"


def test_safe_join_rejects_a_symlink_that_escapes_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("x")
    (root / "escape").symlink_to(outside)
    (root / "file_link").symlink_to(outside / "secret")

    with pytest.raises(UnsafePath, match="outside the location root"):
        safe_join(root, "escape/secret")
    with pytest.raises(UnsafePath, match="outside the location root"):
        safe_join(root, "escape/not/yet/created.fits")
    with pytest.raises(UnsafePath, match="outside the location root"):
        safe_join(root, "file_link")


def test_safe_join_allows_a_symlink_that_stays_inside(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")

    assert safe_join(tmp_path, "alias/file.fits") == tmp_path / "alias" / "file.fits"


def test_safe_join_works_through_a_symlinked_root(tmp_path: Path) -> None:
    (tmp_path / "real_root").mkdir()
    (tmp_path / "root_link").symlink_to(tmp_path / "real_root")

    assert safe_join(tmp_path / "root_link", "a/b") == tmp_path / "root_link" / "a" / "b"


def test_safe_join_refuses_an_empty_root() -> None:
    with pytest.raises(ValueError, match="root is empty"):
        safe_join("", "a")
