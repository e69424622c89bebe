"""Thin Celery tasks: ids in, one service call, small JSON out.

``OperationTask`` is the base of every per-row worker task (seed 002): it acknowledges late,
re-queues when the worker is lost, reports STARTED, speaks JSON, and on failure either resets the
row for another try or fails it for good.
"""

from __future__ import annotations

import inspect
import logging
import socket
from typing import Any

from celery import Task, shared_task

from pipelines.exceptions import is_retryable
from pipelines.models import Operation
from pipelines.services.operations import operation_retry_or_fail

log = logging.getLogger(__name__)


def worker_identity() -> str:
    """Who holds a lease: host and process, so an operator can find the worker."""
    import os

    return f"{socket.gethostname()}:{os.getpid()}"


class OperationTask(Task):
    """Base for tasks whose first argument is the id of an ``operation_model`` row.

    Contract for subclasses: when the task moves its row to ``in_progress`` it sets
    ``lease_owner = worker_identity()``; ``on_failure`` relies on that to recognise its own
    claim and to leave alone a row another worker took over after this one's lease expired.
    """

    abstract = True
    operation_model: type[Operation] | None = None
    acks_late = True
    reject_on_worker_lost = True
    track_started = True
    serializer = "json"
    ignore_result = False
    # Retries are counted on the row, not by Celery: the manager re-dispatches a reset row.
    max_retries = 0

    def _row(self, operation_id: int) -> Operation:
        if self.operation_model is None:
            raise TypeError(f"{self.name} declares no operation_model")
        return self.operation_model._default_manager.get(pk=operation_id)

    def get_retry_count(self, operation_id: int) -> int:
        return self._row(operation_id).retry_count

    def reset_state_on_failure(
        self, operation_id: int, exc: BaseException, *, owner: str | None = None
    ) -> Operation:
        """Back to pending with one more retry used (or failed when none are left). With
        ``owner``, an in-progress row whose lease someone else holds is left alone."""
        return operation_retry_or_fail(
            self._row(operation_id),
            message=_describe(exc),
            actor=f"task:{self.name}",
            retryable=True,
            owner=owner,
        )

    def mark_permanent_failure(
        self, operation_id: int, exc: BaseException, *, owner: str | None = None
    ) -> Operation:
        """Failed for good (and its packages FAILED). ``owner`` as for
        ``reset_state_on_failure``."""
        return operation_retry_or_fail(
            self._row(operation_id),
            message=_describe(exc),
            actor=f"task:{self.name}",
            retryable=False,
            owner=owner,
        )

    def operation_id_name(self) -> str | None:
        """The keyword that carries the row id: the first parameter of ``run`` when it has one
        (``stage_data_task(staging_job_id)``), else ``<table>_id`` of ``operation_model``."""
        try:
            parameters = list(inspect.signature(self.run).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        if parameters and parameters[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            return parameters[0].name
        if self.operation_model is None:
            return None
        return f"{self.operation_model._meta.db_table}_id"

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # The id is the first positional argument or the keyword named for it; never "the first
        # keyword", whose position is the caller's choice and may be any other integer.
        name = self.operation_id_name()
        operation_id = args[0] if args else (kwargs or {}).get(name) if name else None
        if isinstance(operation_id, bool) or not isinstance(operation_id, int):
            log.error(
                "%s failed without an operation id (args=%r, kwargs=%r): %s",
                self.name,
                args,
                kwargs,
                exc,
            )
            return
        # A worker that moves its row to in_progress sets lease_owner = worker_identity(). If
        # another worker holds the row now, this report is late (our lease expired, the row was
        # recovered and re-claimed) and must not reset or fail the newer claim.
        owner = worker_identity()
        try:
            if is_retryable(exc):
                self.reset_state_on_failure(operation_id, exc, owner=owner)
            else:
                self.mark_permanent_failure(operation_id, exc, owner=owner)
        except Exception:  # never let failure handling mask the original error
            log.exception("%s: could not record the failure of row %s", self.name, operation_id)


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if str(exc) else text


@shared_task(name="pipelines.tasks.recover_expired_leases")
def recover_expired_leases() -> dict[str, int]:
    """Periodic: hand back rows claimed by workers that died."""
    from pipelines.services.recovery import recover_expired_leases as recover

    return recover()
