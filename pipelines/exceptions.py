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
    """Our own errors say. Transient failures are worth another go: OS and network errors,
    database and broker connection errors, Redis connection errors and timeouts, a command that
    exited non-zero or timed out (a mount, a remote host, a busy archive), and a task that hit
    its soft time limit. Anything else is a defect that will fail again the same way."""
    if isinstance(exc, OperationError):
        return exc.retryable
    return isinstance(exc, _transient_errors())


def _transient_errors() -> tuple[type[BaseException], ...]:
    import subprocess

    from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
    from django.db import InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerError

    transient: list[type[BaseException]] = [
        OSError,  # includes the builtin ConnectionError and TimeoutError
        OperationalError,
        InterfaceError,
        BrokerError,
        subprocess.CalledProcessError,
        subprocess.TimeoutExpired,
        SoftTimeLimitExceeded,
        TimeLimitExceeded,
    ]
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # redis is optional: the embedded default needs no Redis
        pass
    else:
        transient += [RedisConnectionError, RedisTimeoutError]
    return tuple(transient)
