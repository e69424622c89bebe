"""S3 locations beyond the shared contract: credentials from the environment only (ops-db
behaviour 33), keys under the prefix, multipart uploads that appear only when complete, and the
mapping of S3 and network errors. Everything talks HTTP to moto's standalone server."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from pipelines.exceptions import NonRetryableError, StorageUnavailable, is_retryable
from pipelines.models import DataLocation
from pipelines.storage import s3
from pipelines.storage.base import ObjectNotFound, storage_for
from pipelines.storage.s3 import S3Storage, credential_variables
from tests.factories import DataLocationFactory, SiteFactory
from tests.pipelines.test_storage_contract import (
    TEST_PART_SIZE,
    moto_endpoint,
    new_bucket,
    raw_s3_client,
    s3_storage_factory,
)

__all__ = ["moto_endpoint", "s3_storage_factory"]  # fixtures, used by name

MiB = 1024 * 1024
SECRET = "wJalrXUtnFEMI-this-secret-must-never-reach-the-database"
KEY_ID = "AKIATESTKEYIDNOTINDB"


def _put(storage: S3Storage, path: str, data: bytes) -> tuple[str, int]:
    return storage.put_stream(path, io.BytesIO(data), algorithm="sha256")


# --- credentials ---------------------------------------------------------------------------------
def test_credential_variables_are_named_after_site_and_location() -> None:
    assert credential_variables("cologne", "lta") == (
        "WORKFLOW_S3_COLOGNE_LTA_ACCESS_KEY_ID",
        "WORKFLOW_S3_COLOGNE_LTA_SECRET_ACCESS_KEY",
        "WORKFLOW_S3_COLOGNE_LTA_SESSION_TOKEN",
    )
    assert credential_variables("us-east", "lta.2")[0] == "WORKFLOW_S3_US_EAST_LTA_2_ACCESS_KEY_ID"


def _s3_location(endpoint: str, bucket: str, **fields: Any) -> DataLocation:
    location: DataLocation = DataLocationFactory(
        site=SiteFactory(short_name="cologne"),
        name="lta",
        location_type=DataLocation.LocationType.LONG_TERM_ARCHIVE,
        storage_type=DataLocation.StorageType.S3,
        root_path="",
        s3_endpoint_url=endpoint,
        s3_bucket=bucket,
        s3_region="us-east-1",
        s3_prefix="ccat/raw",
        **fields,
    )
    return location


@pytest.fixture
def clean_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("WORKFLOW_S3_", "AWS_")):
            monkeypatch.delenv(name)


@pytest.mark.django_db
def test_storage_for_reads_the_location_credentials_from_the_environment_only(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, clean_credentials: None
) -> None:
    bucket = new_bucket(moto_endpoint)
    location = _s3_location(moto_endpoint, bucket)
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_SECRET_ACCESS_KEY", SECRET)

    storage = storage_for(location)
    assert isinstance(storage, S3Storage)
    assert storage.label == "cologne:lta"
    _put(storage, "pkg/a.tar", b"archived bytes")
    assert raw_s3_client(moto_endpoint).get_object(Bucket=bucket, Key="ccat/raw/pkg/a.tar")[
        "Body"
    ].read() == (b"archived bytes")

    # Behaviour 33: nothing of the credentials was written to the location's row.
    location.refresh_from_db()
    row = DataLocation.objects.filter(pk=location.pk).values().get()
    for field, value in row.items():
        assert SECRET not in str(value), field
        assert KEY_ID not in str(value), field
    assert SECRET not in repr(storage)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ((), ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY")),
        (("ACCESS_KEY_ID",), ("SECRET_ACCESS_KEY",)),
        (("SECRET_ACCESS_KEY",), ("ACCESS_KEY_ID",)),
    ],
    ids=["none", "no-secret", "no-key-id"],
)
def test_a_missing_credential_is_a_permanent_error_naming_the_variable_not_the_value(
    monkeypatch: pytest.MonkeyPatch,
    clean_credentials: None,
    present: tuple[str, ...],
    missing: tuple[str, ...],
) -> None:
    location = _s3_location("http://127.0.0.1:9", "some-bucket")
    values = {"ACCESS_KEY_ID": KEY_ID, "SECRET_ACCESS_KEY": SECRET}
    for suffix in present:
        monkeypatch.setenv(f"WORKFLOW_S3_COLOGNE_LTA_{suffix}", values[suffix])

    with pytest.raises(NonRetryableError) as caught:
        storage_for(location)

    message = str(caught.value)
    assert message.startswith("cologne:lta: S3 credentials missing")
    for suffix in missing:
        assert f"WORKFLOW_S3_COLOGNE_LTA_{suffix}" in message
    assert SECRET not in message and KEY_ID not in message


@pytest.mark.django_db
def test_the_standard_aws_variables_are_not_a_fallback(
    monkeypatch: pytest.MonkeyPatch, clean_credentials: None
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(NonRetryableError, match="WORKFLOW_S3_COLOGNE_LTA_ACCESS_KEY_ID"):
        storage_for(_s3_location("http://127.0.0.1:9", "some-bucket"))


# --- keys and prefix -----------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["ccat/raw", "ccat/raw/", "/ccat/raw/"])
def test_keys_are_the_prefix_plus_the_canonical_relative_path(
    s3_storage_factory: Callable[..., S3Storage], prefix: str
) -> None:
    storage = s3_storage_factory(prefix=prefix)
    assert storage.key("obs1//./file.bin") == "ccat/raw/obs1/file.bin"
    assert s3_storage_factory(prefix="").key("obs1/file.bin") == "obs1/file.bin"


def test_a_prefix_that_could_climb_is_refused() -> None:
    with pytest.raises(NonRetryableError, match="s3_prefix"):
        S3Storage(bucket="b", access_key_id="k", secret_access_key="s", prefix="a/../b")


def test_objects_outside_the_prefix_are_not_listed(
    s3_storage_factory: Callable[..., S3Storage], moto_endpoint: str
) -> None:
    storage = s3_storage_factory(prefix="ccat/raw")
    client = raw_s3_client(moto_endpoint)
    client.put_object(Bucket=storage.bucket, Key="ccat/rawfoo/not-mine", Body=b"x")
    client.put_object(Bucket=storage.bucket, Key="other/not-mine", Body=b"x")
    client.put_object(Bucket=storage.bucket, Key="ccat/raw/dir/", Body=b"")  # a folder marker
    _put(storage, "dir/mine.bin", b"x")

    assert list(storage.list()) == ["dir/mine.bin"]
    assert storage.free_bytes() is None


# --- multipart uploads ---------------------------------------------------------------------------
def test_a_long_stream_is_a_multipart_upload_invisible_until_complete(
    s3_storage_factory: Callable[..., S3Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = s3_storage_factory()
    visible_during_upload: list[bool] = []
    real_upload_part = storage.client.upload_part

    def upload_part(**kwargs: Any) -> Any:
        answer = real_upload_part(**kwargs)
        visible_during_upload.append(storage.exists("pkg/big.tar"))
        return answer

    monkeypatch.setattr(storage.client, "upload_part", upload_part)
    data = os.urandom(2 * TEST_PART_SIZE + 1)
    _put(storage, "pkg/big.tar", data)

    assert visible_during_upload == [False, False, False]
    head = storage.client.head_object(Bucket=storage.bucket, Key=storage.key("pkg/big.tar"))
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    assert storage.size("pkg/big.tar") == len(data)


def test_an_s3_error_mid_upload_aborts_it_and_is_retryable(
    s3_storage_factory: Callable[..., S3Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = s3_storage_factory()
    real_upload_part = storage.client.upload_part

    def throttled_on_part_two(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            raise ClientError(
                {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                "UploadPart",
            )
        return real_upload_part(**kwargs)

    monkeypatch.setattr(storage.client, "upload_part", throttled_on_part_two)
    expected = r"test:lta: cannot write 'pkg/big\.tar'.*SlowDown"
    with pytest.raises(StorageUnavailable, match=expected):
        _put(storage, "pkg/big.tar", os.urandom(2 * TEST_PART_SIZE + 1))

    assert not storage.exists("pkg/big.tar")
    assert storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", []) == []


def test_part_sizes_grow_so_any_stream_fits_in_ten_thousand_parts() -> None:
    storage = S3Storage(bucket="b", access_key_id="k", secret_access_key="s")
    sizes = [storage._part_size(n) for n in range(1, 10_001)]
    assert sizes[0] == sizes[999] == 8 * MiB
    assert sizes[1000] == 16 * MiB
    assert max(sizes) <= 5 * 1024**3
    assert sum(sizes) >= 5 * 1024**4  # S3's largest object, 5 TiB


# --- errors --------------------------------------------------------------------------------------
def test_a_missing_bucket_is_a_permanent_error_not_a_missing_object(
    s3_storage_factory: Callable[..., S3Storage],
) -> None:
    storage = s3_storage_factory(bucket="no-such-bucket-here")
    for call in (
        lambda: storage.exists("a.tar"),
        lambda: _put(storage, "a.tar", b"x"),
        lambda: list(storage.list()),
    ):
        with pytest.raises(NonRetryableError, match="no-such-bucket-here") as caught:
            call()
        assert not isinstance(caught.value, ObjectNotFound)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_endpoint_is_retryable(s3_storage_factory: Callable[..., S3Storage]) -> None:
    storage = s3_storage_factory(bucket="any-bucket")
    # The same storage pointed at a port nobody listens on, without botocore's own retries (they
    # back off for seconds).
    storage.client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2),
    )
    for call in (
        lambda: storage.exists("a.tar"),
        lambda: _put(storage, "a.tar", b"x"),
        lambda: storage.checksum("a.tar", "sha256"),
        lambda: storage.delete("a.tar"),
    ):
        with pytest.raises(StorageUnavailable, match=r"test:lta: .*unreachable") as caught:
            call()
        assert is_retryable(caught.value)


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("SlowDown", 503, StorageUnavailable),
        ("Throttling", 400, StorageUnavailable),
        ("InternalError", 500, StorageUnavailable),
        ("RequestTimeout", 400, StorageUnavailable),
        ("TooManyRequests", 429, StorageUnavailable),
        ("AccessDenied", 403, NonRetryableError),
        ("InvalidAccessKeyId", 403, NonRetryableError),
        ("SignatureDoesNotMatch", 403, NonRetryableError),
        ("NoSuchBucket", 404, NonRetryableError),
        ("NoSuchKey", 404, ObjectNotFound),
        ("InvalidArgument", 400, NonRetryableError),
    ],
)
def test_s3_error_codes_map_to_retryable_or_permanent_errors(
    code: str, status: int, expected: type[Exception]
) -> None:
    storage = S3Storage(bucket="b", access_key_id="k", secret_access_key="s", label="cologne:lta")
    error = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )
    with pytest.raises(expected, match="cologne:lta: cannot write 'x'") as caught:
        storage._raise(error, "write", "x")
    assert type(caught.value) is expected
    assert is_retryable(caught.value) == (expected is StorageUnavailable)


def test_clients_are_shared_per_endpoint_and_key(
    s3_storage_factory: Callable[..., S3Storage],
) -> None:
    assert s3_storage_factory().client is s3_storage_factory().client
    assert s3_storage_factory().client is not s3_storage_factory(secret_access_key="other").client
    assert s3._client.cache_info().currsize <= 32
