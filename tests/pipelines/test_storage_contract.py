"""The Storage contract, run against every backend: a disk directory and a bucket on moto's
standalone S3 server (real HTTP through boto3, started once per session on 127.0.0.1).

Also the home of the fixtures the backend-specific modules share (``moto_endpoint``,
``s3_storage_factory``).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import xxhash

from pipelines.exceptions import UnsafePath
from pipelines.storage.base import ObjectNotFound, Storage, copy
from pipelines.storage.checksums import CHUNK_SIZE
from pipelines.storage.posix import PosixStorage
from pipelines.storage.s3 import S3Storage
from tests.conftest import require_service

MiB = 1024 * 1024
# The smallest part S3 (and moto) accept for all but the last part: the tests use it so that a
# multipart upload of a few parts stays small.
TEST_PART_SIZE = 5 * MiB
TEST_KEY_ID = "test-access-key-id"
TEST_SECRET = "test-secret-access-key-do-not-store"


# --- the moto server and the two backends --------------------------------------------------------
@functools.cache
def _start_moto() -> tuple[str | None, str]:
    """(endpoint URL, "") or (None, why not). Started once per process whichever module asks."""
    try:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    except Exception as exc:  # an import error, a missing flask, a refused bind...
        return None, f"moto's S3 server could not start ({type(exc).__name__}: {exc})"
    atexit.register(server.stop)
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", ""


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    endpoint, reason = _start_moto()
    require_service(endpoint is not None, reason)
    assert endpoint is not None
    return endpoint


def raw_s3_client(endpoint: str) -> Any:
    """A plain boto3 client for arranging and inspecting what the storage under test did."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=TEST_KEY_ID,
        aws_secret_access_key=TEST_SECRET,
    )


def new_bucket(endpoint: str) -> str:
    bucket = f"storage-test-{uuid.uuid4().hex[:12]}"
    raw_s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_storage_factory(moto_endpoint: str) -> Callable[..., S3Storage]:
    """Builds an S3Storage on a fresh bucket of the moto server (keyword overrides allowed)."""

    def build(**overrides: Any) -> S3Storage:
        options: dict[str, Any] = {
            "bucket": overrides.pop("bucket", None) or new_bucket(moto_endpoint),
            "access_key_id": TEST_KEY_ID,
            "secret_access_key": TEST_SECRET,
            "endpoint_url": moto_endpoint,
            "region": "us-east-1",
            "prefix": "archive/",
            "label": "test:lta",
            "part_size": TEST_PART_SIZE,
        }
        options.update(overrides)
        return S3Storage(**options)

    return build


class Backend:
    """A storage under test plus the ways a test reaches behind its back."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def corrupt(self, relative_path: str, offset: int) -> None:
        raise NotImplementedError

    def leftovers(self) -> list[str]:
        """Temporary files or unfinished uploads a write left behind."""
        raise NotImplementedError


class PosixBackend(Backend):
    storage: PosixStorage

    def corrupt(self, relative_path: str, offset: int) -> None:
        with open(self.storage.root / relative_path, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0x01]))

    def leftovers(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.storage.root))
            for p in self.storage.root.rglob("*")
            if p.name.endswith(".partial")
        )


class S3Backend(Backend):
    storage: S3Storage

    def corrupt(self, relative_path: str, offset: int) -> None:
        client, bucket, key = (
            self.storage.client,
            self.storage.bucket,
            self.storage.key(relative_path),
        )
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[offset] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    def leftovers(self) -> list[str]:
        answer = self.storage.client.list_multipart_uploads(Bucket=self.storage.bucket)
        return sorted(upload["Key"] for upload in answer.get("Uploads", []))


def _posix_backend(tmp_path: Path, _factory: Any) -> Backend:
    root = tmp_path / "disk-root"
    root.mkdir()
    return PosixBackend(PosixStorage(root, label="test:buffer"))


def _s3_backend(_tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    factory = request.getfixturevalue("s3_storage_factory")
    return S3Backend(factory())


BACKENDS = {"posix": _posix_backend, "s3": _s3_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](tmp_path, request)


class FailingReader:
    """Yields ``good`` bytes, then raises: a source that dies mid-copy."""

    def __init__(self, good: int) -> None:
        self._left = good

    def read(self, n: int = -1, /) -> bytes:
        if self._left <= 0:
            raise RuntimeError("source went away")
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return b"x" * n


def _put(storage: Storage, path: str, data: bytes, algorithm: str = "sha256") -> tuple[str, int]:
    return storage.put_stream(path, io.BytesIO(data), algorithm=algorithm)


def _read(storage: Storage, path: str) -> bytes:
    with storage.get_stream(path) as reader:
        return b"".join(iter(lambda: reader.read(CHUNK_SIZE), b""))


def _digest(data: bytes, algorithm: str) -> str:
    return (
        hashlib.sha256(data).hexdigest()
        if algorithm == "sha256"
        else xxhash.xxh3_128_hexdigest(data)
    )


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
@pytest.mark.parametrize(
    "size",
    [0, 1, 100_000, TEST_PART_SIZE, 2 * TEST_PART_SIZE + 12_345],
    ids=["empty", "one-byte", "small", "exactly-one-part", "three-parts"],
)
def test_put_get_checksum_size_exists_delete_round_trip(
    backend: Backend, size: int, algorithm: str
) -> None:
    storage = backend.storage
    data = os.urandom(size)

    assert _put(storage, "raw/2024/obs1/file.bin", data, algorithm) == (
        _digest(data, algorithm),
        size,
    )

    assert storage.exists("raw/2024/obs1/file.bin")
    assert storage.size("raw/2024/obs1/file.bin") == size
    assert _read(storage, "raw/2024/obs1/file.bin") == data
    assert storage.checksum("raw/2024/obs1/file.bin", algorithm) == (_digest(data, algorithm), size)

    storage.delete("raw/2024/obs1/file.bin")
    assert not storage.exists("raw/2024/obs1/file.bin")
    storage.delete("raw/2024/obs1/file.bin")  # idempotent
    assert backend.leftovers() == []


def test_put_replaces_an_existing_object(backend: Backend) -> None:
    _put(backend.storage, "a.bin", b"old contents")
    _put(backend.storage, "a.bin", b"new")
    assert _read(backend.storage, "a.bin") == b"new"
    assert backend.storage.size("a.bin") == 3


def test_the_stream_is_hashed_as_written_whatever_the_chunking(backend: Backend) -> None:
    """A reader that hands out odd-sized short reads (a pipe, a socket) still lands whole."""
    data = os.urandom(TEST_PART_SIZE + 777)

    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self._source = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            chunk = self._source.read(min(len(buffer), 65_537))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    assert backend.storage.put_stream("t.bin", Trickle(), algorithm="xxh3_128") == (
        xxhash.xxh3_128_hexdigest(data),
        len(data),
    )
    assert _read(backend.storage, "t.bin") == data


def test_reading_what_is_not_there_is_object_not_found(backend: Backend) -> None:
    storage = backend.storage
    assert not storage.exists("nothing/here.bin")
    with pytest.raises(ObjectNotFound, match=r"nothing/here\.bin"):
        storage.size("nothing/here.bin")
    with pytest.raises(ObjectNotFound, match=r"nothing/here\.bin"):
        storage.checksum("nothing/here.bin", "sha256")
    with pytest.raises(ObjectNotFound), storage.get_stream("nothing/here.bin"):
        pass


def test_list_yields_relative_paths_in_code_point_order(backend: Backend) -> None:
    storage = backend.storage
    # "a.txt" < "a/b" < "a0" in code-point order ("." < "/" < "0"), the order S3 lists keys in.
    for path in ["a0", "a/b", "a.txt", "a/c/d.bin", "z/y/x.bin", "b"]:
        _put(storage, path, path.encode())

    assert list(storage.list()) == ["a.txt", "a/b", "a/c/d.bin", "a0", "b", "z/y/x.bin"]
    assert list(storage.list("a")) == ["a/b", "a/c/d.bin"]
    assert list(storage.list("a/c/")) == ["a/c/d.bin"]
    assert list(storage.list("missing")) == []


# --- atomicity -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "good", [0, 1000, TEST_PART_SIZE + 1000], ids=["at-once", "small", "mid-upload"]
)
def test_a_failing_reader_leaves_no_object_and_no_temporary(backend: Backend, good: int) -> None:
    with pytest.raises(RuntimeError, match="source went away"):
        backend.storage.put_stream("pkg/new.tar", FailingReader(good), algorithm="sha256")

    assert not backend.storage.exists("pkg/new.tar")
    assert list(backend.storage.list()) == []
    assert backend.leftovers() == []


def test_a_failing_reader_leaves_the_previous_object_intact(backend: Backend) -> None:
    _put(backend.storage, "pkg/old.tar", b"the registered bytes")
    with pytest.raises(RuntimeError):
        backend.storage.put_stream(
            "pkg/old.tar", FailingReader(TEST_PART_SIZE + 10), algorithm="sha256"
        )
    assert _read(backend.storage, "pkg/old.tar") == b"the registered bytes"
    assert backend.leftovers() == []


# --- paths ---------------------------------------------------------------------------------------
UNSAFE = ["../escape.bin", "a/../../escape.bin", "/etc/passwd", "", "a/\x00b", ".", "a/.."]


@pytest.mark.parametrize("path", UNSAFE)
def test_unsafe_paths_are_refused_by_every_method(backend: Backend, path: str) -> None:
    storage = backend.storage
    calls: list[Callable[[], object]] = [
        lambda: _put(storage, path, b"x"),
        lambda: storage.get_stream(path).__enter__(),
        lambda: storage.checksum(path, "sha256"),
        lambda: storage.exists(path),
        lambda: storage.size(path),
        lambda: storage.delete(path),
        lambda: list(storage.list(path or "..")),
    ]
    for call in calls:
        with pytest.raises(UnsafePath):
            call()


# --- integrity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
def test_a_byte_flipped_on_storage_is_seen_by_checksum(backend: Backend, algorithm: str) -> None:
    data = os.urandom(300_000)
    written, size = _put(backend.storage, "pkg/p.tar", data, algorithm)

    backend.corrupt("pkg/p.tar", 123_456)

    reread, resize = backend.storage.checksum("pkg/p.tar", algorithm)
    assert resize == size
    assert reread != written


# --- copy between backends -----------------------------------------------------------------------
@pytest.fixture
def two_backends(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Backend, Backend]]:
    source_kind, dest_kind = request.param
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    yield (
        BACKENDS[source_kind](tmp_path / "src", request),
        BACKENDS[dest_kind](tmp_path / "dst", request),
    )


@pytest.mark.parametrize("algorithm", ["sha256", "xxh3_128"])
@pytest.mark.parametrize(
    "two_backends",
    [("posix", "s3"), ("s3", "posix"), ("posix", "posix"), ("s3", "s3")],
    ids=["posix-to-s3", "s3-to-posix", "posix-to-posix", "s3-to-s3"],
    indirect=True,
)
def test_copy_streams_between_storages_hashing_while_copying(
    two_backends: tuple[Backend, Backend], algorithm: str
) -> None:
    source, dest = two_backends
    data = os.urandom(2 * TEST_PART_SIZE + 4321)
    _put(source.storage, "buffer/pkg.tar", data)

    result = copy(
        source.storage, "buffer/pkg.tar", dest.storage, "lta/pkg.tar", algorithm=algorithm
    )

    expected = _digest(data, algorithm)
    assert result == (expected, len(data))
    assert dest.storage.checksum("lta/pkg.tar", algorithm) == (expected, len(data))
    assert _read(dest.storage, "lta/pkg.tar") == data
    assert dest.leftovers() == []


def test_copy_of_a_missing_source_writes_nothing(backend: Backend, tmp_path: Path) -> None:
    (tmp_path / "empty-source").mkdir()
    source = PosixStorage(tmp_path / "empty-source", label="test:source")
    with pytest.raises(ObjectNotFound):
        copy(source, "not-there.tar", backend.storage, "dest.tar", algorithm="sha256")
    assert not backend.storage.exists("dest.tar")
