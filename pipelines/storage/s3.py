"""S3 locations (AWS or any S3-compatible store): objects under ``s3_prefix`` in ``s3_bucket``.

Credentials never live in the database (ops-db behaviour 33, SPEC §2). Each location reads its
own pair from the environment of the worker that serves it::

    WORKFLOW_S3_<SITE>_<LOCATION>_ACCESS_KEY_ID
    WORKFLOW_S3_<SITE>_<LOCATION>_SECRET_ACCESS_KEY
    WORKFLOW_S3_<SITE>_<LOCATION>_SESSION_TOKEN      (optional, temporary credentials)

with ``<SITE>`` the site's short name and ``<LOCATION>`` the location's name, upper-cased, every
character outside A-Z and 0-9 replaced by "_" (site ``cologne``, location ``lta`` →
``WORKFLOW_S3_COLOGNE_LTA_ACCESS_KEY_ID``). There is deliberately no fallback to ``AWS_*``
variables, ``~/.aws/credentials`` or instance roles: with two archives on two endpoints a
fallback would send one location's requests with another's keys, and a typo in a variable name
would go unnoticed until an access-denied error far from its cause.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from pipelines.exceptions import NonRetryableError, StorageUnavailable, UnsafePath

from .base import ObjectNotFound, Reader, Storage, StoredObject, location_label
from .checksums import new_hasher
from .paths import normalize_relative_path

if TYPE_CHECKING:
    from pipelines.models import DataLocation

logger = logging.getLogger(__name__)

ENV_PREFIX = "WORKFLOW_S3"

# Streams up to one part are a single PUT; longer ones a multipart upload of these parts. S3
# allows at most 10,000 parts, so the part size doubles every 1,000 parts (8 MiB parts cover
# the first 7.8 GiB, 16 MiB the next 15.6 GiB...): any stream fits without knowing its size.
PART_SIZE = 8 * 1024 * 1024
_PARTS_PER_SIZE = 1000
_MAX_PART_SIZE = 5 * 1024**3

# Error codes after which trying again cannot help: fix the configuration or the policy.
_PERMANENT_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidAccessKeyId",
    "InvalidBucketName",
    "NoSuchBucket",
    "SignatureDoesNotMatch",
    "InvalidObjectState",  # archived to a cold tier: needs a restore first
}
# Busy or briefly sick: back off and retry (5xx answers are treated the same way).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def credential_variables(site_short_name: str, location_name: str) -> tuple[str, str, str]:
    """Names of the access key id, secret access key and session token variables."""
    stem = re.sub(r"[^A-Z0-9]", "_", f"{site_short_name}_{location_name}".upper())
    base = f"{ENV_PREFIX}_{stem}"
    return f"{base}_ACCESS_KEY_ID", f"{base}_SECRET_ACCESS_KEY", f"{base}_SESSION_TOKEN"


@functools.lru_cache(maxsize=32)
def _client(
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str,
    secret_access_key: str,
    session_token: str | None,
) -> Any:
    """One client per endpoint and key pair, reused across tasks (boto3 clients are thread-safe
    and take ~0.1 s to build)."""
    config = Config(
        connect_timeout=10,
        read_timeout=120,
        # botocore retries throttling and 5xx a few times itself before we see the error.
        retries={"max_attempts": 4, "mode": "standard"},
        # S3-compatible stores (Ceph, MinIO, Coscine) want bucket names in the path.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        # Integrity is ours: every copy is hashed while written and read back in full.
        # The newer default (CRC32 trailers on every upload) breaks some S3-compatible stores.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        aws_session_token=session_token,
        config=config,
    )


class S3Storage(Storage):
    def __init__(
        self,
        *,
        bucket: str,
        access_key_id: str,
        secret_access_key: str,
        session_token: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "",
        label: str = "",
        part_size: int = PART_SIZE,
    ) -> None:
        self.label = label or f"s3://{bucket}"
        if not bucket:
            raise NonRetryableError(f"{self.label}: s3_bucket is empty")
        self.bucket = bucket
        self.prefix = _normalize_prefix(prefix, self.label)
        self.part_size = part_size
        self.client = _client(
            endpoint_url or None, region or None, access_key_id, secret_access_key, session_token
        )
        self._bucket_checked = False

    @classmethod
    def from_location(cls, location: DataLocation) -> S3Storage:
        label = location_label(location)
        key_var, secret_var, token_var = credential_variables(
            location.site.short_name, location.name
        )
        missing = [name for name in (key_var, secret_var) if not os.environ.get(name)]
        if missing:
            raise NonRetryableError(
                f"{label}: S3 credentials missing: set {' and '.join(missing)} in the "
                "environment of the workers serving this location"
            )
        return cls(
            bucket=location.s3_bucket,
            access_key_id=os.environ[key_var],
            secret_access_key=os.environ[secret_var],
            session_token=os.environ.get(token_var) or None,
            endpoint_url=location.s3_endpoint_url,
            region=location.s3_region,
            prefix=location.s3_prefix,
            label=label,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.label}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    def key(self, relative_path: str) -> str:
        """The object key of ``relative_path``: prefix + canonical relative path."""
        return self.prefix + normalize_relative_path(relative_path)

    # -- errors -------------------------------------------------------------------------------

    def _raise(self, exc: BaseException, action: str, relative_path: str) -> NoReturn:
        where = f"{self.label}: cannot {action} {relative_path!r} (bucket {self.bucket!r})"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            detail = f"{code or status}: {error.get('Message') or 'no message'}"
            if code in _MISSING_CODES:
                raise ObjectNotFound(f"{where}: no such object") from exc
            if code in _PERMANENT_CODES or status in (401, 403):
                raise NonRetryableError(f"{where}: {detail}") from exc
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                raise StorageUnavailable(f"{where}: {detail}") from exc
            raise NonRetryableError(f"{where}: {detail}") from exc
        if isinstance(exc, BotoConnectionError | HTTPClientError | urllib3.exceptions.HTTPError):
            raise StorageUnavailable(f"{where}: endpoint unreachable: {exc}") from exc
        if isinstance(exc, OSError):
            raise StorageUnavailable(f"{where}: {exc}") from exc
        raise NonRetryableError(f"{where}: {exc}") from exc

    def _require_bucket(self) -> None:
        """HEAD answers 404 without a body both for a missing key and a missing bucket; before
        saying "not there", prove the bucket is (once per Storage)."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _MISSING_CODES:
                raise NonRetryableError(f"{self.label}: no such bucket {self.bucket!r}") from exc
            self._raise(exc, "reach", "")
        except (BotoCoreError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, "reach", "")
        self._bucket_checked = True

    # -- writing ------------------------------------------------------------------------------

    def put_stream(self, relative_path: str, reader: Reader, *, algorithm: str) -> tuple[str, int]:
        key = self.key(relative_path)
        hasher = new_hasher(algorithm)
        first = _read_part(reader, self.part_size)
        hasher.update(first)
        if len(first) < self.part_size:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=first)
            except (BotoCoreError, ClientError, urllib3.exceptions.HTTPError) as exc:
                self._raise(exc, "write", relative_path)
            return hasher.hexdigest(), len(first)
        return self._put_multipart(relative_path, key, reader, hasher, first)

    def _put_multipart(
        self, relative_path: str, key: str, reader: Reader, hasher: Any, first: bytes
    ) -> tuple[str, int]:
        """Upload ``first`` and the rest of ``reader`` as parts. The object appears only when
        the upload completes; on any failure the upload is aborted, so S3 neither shows nor
        bills a partial object."""
        try:
            started = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
            upload_id = started["UploadId"]
        except (BotoCoreError, ClientError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, "write", relative_path)
        parts: list[dict[str, Any]] = []
        total = 0
        data = first
        try:
            while True:
                number = len(parts) + 1
                answer = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
                total += len(data)
                data = _read_part(reader, self._part_size(number + 1))
                if not data:
                    break
                hasher.update(data)
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            self._abort(key, upload_id)
            if isinstance(exc, BotoCoreError | ClientError | urllib3.exceptions.HTTPError):
                self._raise(exc, "write", relative_path)
            raise
        return hasher.hexdigest(), total

    def _part_size(self, number: int) -> int:
        return min(self.part_size * 2 ** ((number - 1) // _PARTS_PER_SIZE), _MAX_PART_SIZE)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:
            # The bucket's lifecycle rule for incomplete uploads is the backstop; the object
            # was never completed, so nothing partial is visible either way.
            logger.warning(
                "%s: could not abort multipart upload %s of %r", self.label, upload_id, key
            )

    # -- reading ------------------------------------------------------------------------------

    @contextmanager
    def get_stream(self, relative_path: str) -> Iterator[_ObjectReader]:
        key = self.key(relative_path)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, "read", relative_path)
        body = answer["Body"]
        try:
            yield _ObjectReader(body, self, relative_path)
        finally:
            body.close()

    def _head(self, relative_path: str) -> dict[str, Any] | None:
        try:
            answer: dict[str, Any] = self.client.head_object(
                Bucket=self.bucket, Key=self.key(relative_path)
            )
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _MISSING_CODES:
                self._require_bucket()
                return None
            self._raise(exc, "look up", relative_path)
        except (BotoCoreError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, "look up", relative_path)
        return answer

    def exists(self, relative_path: str) -> bool:
        return self._head(relative_path) is not None

    def size(self, relative_path: str) -> int:
        answer = self._head(relative_path)
        if answer is None:
            raise ObjectNotFound(
                f"{self.label}: cannot look up {relative_path!r} (bucket {self.bucket!r}): "
                "no such object"
            )
        return int(answer["ContentLength"])

    def rename(self, source_path: str, target_path: str) -> None:
        # S3 has no rename: a server-side copy (atomic for readers of the target key, the bytes
        # never leave the store), then the source goes. CopyObject takes at most 5 GiB; larger
        # objects go through boto3's managed copy (multipart UploadPartCopy).
        source = {"Bucket": self.bucket, "Key": self.key(source_path)}
        target = self.key(target_path)
        size = self.size(source_path)
        try:
            if size <= _MAX_PART_SIZE:
                self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=target)
            else:
                self.client.copy(source, self.bucket, target)
        except (BotoCoreError, ClientError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, "rename", source_path)
        self.delete(source_path)

    def delete(self, relative_path: str) -> None:
        # S3 answers 204 for a key that is not there: idempotent as it stands.
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(relative_path))
        except (BotoCoreError, ClientError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, "delete", relative_path)

    def list(self, prefix: str = "") -> Iterator[str]:
        for item in self.list_entries(prefix):
            yield item.relative_path

    def list_entries(self, prefix: str = "") -> Iterator[StoredObject]:
        # ListObjectsV2 returns keys in UTF-8 byte order, which is code-point order, one page
        # of at most 1,000 keys at a time.
        start = self.prefix + (normalize_relative_path(prefix) + "/" if prefix else "")
        cut = len(self.prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    if not key.endswith("/"):  # "directory" marker objects of some tools
                        yield StoredObject(key[cut:], int(item["Size"]), item["LastModified"])
        except (BotoCoreError, ClientError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, "list", prefix or ".")

    def free_bytes(self) -> int | None:
        return None


class _ObjectReader:
    """The body of a GET; a dropped connection mid-read is a retryable StorageUnavailable that
    names this location (not the destination a copy was writing to)."""

    def __init__(self, body: Any, storage: S3Storage, relative_path: str) -> None:
        self._body = body
        self._storage = storage
        self._relative_path = relative_path

    def read(self, n: int = -1, /) -> bytes:
        try:
            data: bytes = self._body.read(None if n is None or n < 0 else n)
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            self._storage._raise(exc, "read", self._relative_path)
        return data


def _read_part(reader: Reader, size: int) -> bytes:
    """Up to ``size`` bytes of ``reader``; fewer only at the end of the stream."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    readinto = getattr(reader, "readinto", None)
    while filled < size:
        if readinto is not None:
            count = readinto(view[filled:])
        else:
            data = reader.read(size - filled)
            count = len(data)
            view[filled : filled + count] = data
        if not count:
            break
        filled += count
    return bytes(view[:filled])


def _normalize_prefix(prefix: str, label: str) -> str:
    """The key prefix: ``archive``, ``archive/`` and ``/archive/`` all give ``archive/``."""
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    try:
        return normalize_relative_path(stripped) + "/"
    except UnsafePath as exc:
        raise NonRetryableError(f"{label}: s3_prefix {prefix!r} is not usable: {exc}") from None
