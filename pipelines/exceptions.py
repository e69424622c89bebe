"""Errors the data path raises. Each says whether trying again can help; the task base class
uses that to reset a row for retry or fail it at once."""

from __future__ import annotations


class OperationError(Exception):
    """A data operation failed. Retryable unless a subclass says otherwise."""

    retryable = True


class NonRetryableError(OperationError):
    """Trying again cannot help (bad input, missing configuration, a path outside its root)."""

    retryable = False


class ChecksumMismatch(OperationError):
    """The bytes at the destination are not the bytes we registered; a fresh copy may fix it."""


class StorageUnavailable(OperationError):
    """A location could not be reached (mount missing, network, S3 endpoint down)."""


class UnsafePath(NonRetryableError):
    """A path from a user or from data tried to leave its location's root."""


class IngestError(NonRetryableError):
    """An ingest request was malformed or contradicts what is registered."""


def is_retryable(exc: BaseException) -> bool:
    """Our own errors say; OS, network and database hiccups are worth another go; anything else
    is a defect that will fail again the same way."""
    if isinstance(exc, OperationError):
        return exc.retryable
    from django.db import InterfaceError, OperationalError

    return isinstance(
        exc, OSError | TimeoutError | ConnectionError | OperationalError | InterfaceError
    )
