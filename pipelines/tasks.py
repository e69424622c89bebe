"""Thin Celery tasks: ids in, one service call, small JSON out.

``OperationTask`` is the base of every per-row worker task (seed 002): it acknowledges late,
re-queues when the worker is lost, reports STARTED, speaks JSON, and on failure either resets the
row for another try or fails it for good.
"""

from __future__ import annotations

import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_ready, worker_shutdown

from pipelines.exceptions import is_retryable
from pipelines.models import (
    CopyRepair,
    DataTransfer,
    DataTransferPackage,
    DeletionTask,
    LongTermArchiveTransfer,
    Operation,
    RawDataPackage,
    StagingJob,
)
from pipelines.services.operations import operation_fail

log = logging.getLogger(__name__)


def worker_identity() -> str:
    """Who holds a lease, for people: host, process and thread, so an operator can find the
    worker. Ownership itself is decided by the claim token, never by this name (threads of one
    pool share a host and a process)."""
    import os
    import threading

    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_native_id()}"


# The keyword every per-row task receives with the claim token of the row it works on.
CLAIM_TOKEN = "claim_token"


class OperationTask(Task):
    """Base for tasks whose first argument is the id of an ``operation_model`` row and whose
    keyword ``claim_token`` is the token of the manager's claim on that row.

    ``state_field`` is the phase the task works on (``status``; ``unpack_status`` for an unpack
    task). On failure the row is settled through ``operation_fail``: retryable errors reset it
    for another try while retries remain, others fail it for good, and a report from a claim
    that no longer holds the row changes nothing.
    """

    abstract = True
    operation_model: type[Operation] | None = None
    state_field = "status"
    acks_late = True
    reject_on_worker_lost = True
    track_started = True
    serializer = "json"
    ignore_result = False
    # Retries are counted on the row, not by Celery: the manager re-dispatches a reset row.
    max_retries = 0

    def _model(self) -> type[Operation]:
        if self.operation_model is None:
            raise TypeError(f"{self.name} declares no operation_model")
        return self.operation_model

    def get_retry_count(self, operation_id: int) -> int:
        model = self._model()
        row = model._default_manager.get(pk=operation_id)
        return int(getattr(row, model.PHASES[self.state_field].retry_field))

    def reset_state_on_failure(self, operation_id: int, exc: BaseException, *, token: str) -> bool:
        """Back to pending with one more retry used (or failed when none are left), if the claim
        ``token`` still holds the row. Returns True when the row moved."""
        return self._settle(operation_id, exc, token=token, retryable=True)

    def mark_permanent_failure(self, operation_id: int, exc: BaseException, *, token: str) -> bool:
        """Failed for good (and its packages FAILED), if ``token`` still holds the row."""
        return self._settle(operation_id, exc, token=token, retryable=False)

    def _settle(
        self, operation_id: int, exc: BaseException, *, token: str, retryable: bool
    ) -> bool:
        return _with_live_connection(
            lambda: operation_fail(
                self._model(),
                operation_id,
                token=token,
                message=_describe(exc),
                actor=f"task:{self.name}",
                retryable=retryable,
                field=self.state_field,
            )
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
        kwargs = kwargs or {}
        name = self.operation_id_name()
        operation_id = args[0] if args else kwargs.get(name) if name else None
        token = kwargs.get(CLAIM_TOKEN)
        if isinstance(operation_id, bool) or not isinstance(operation_id, int):
            log.error(
                "%s failed without an operation id (args=%r, kwargs=%r): %s",
                self.name,
                args,
                kwargs,
                exc,
            )
            return
        if not isinstance(token, str) or not token:
            # Nobody can tell whether this run still held the row; the lease reconciler hands
            # the row back once its lease expires.
            log.error(
                "%s failed for row %s without a claim token; left to lease recovery: %s",
                self.name,
                operation_id,
                exc,
            )
            return
        try:
            self._settle(operation_id, exc, token=token, retryable=is_retryable(exc))
        except Exception:  # never let failure handling mask the original error
            log.exception("%s: could not record the failure of row %s", self.name, operation_id)


def _with_live_connection(record: Callable[[], bool]) -> bool:
    """Run ``record`` on a working database connection. A failing task may have left the
    connection dead (the server restarted, the backend was terminated): drop an unusable
    connection first, and on a connection error reconnect and try once more, so the failure is
    recorded now instead of waiting for lease expiry. Inside an atomic block (the caller's
    transaction) the connection is left alone."""
    from django.db import InterfaceError, OperationalError, connection

    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()
    try:
        return record()
    except (InterfaceError, OperationalError):
        if connection.in_atomic_block:
            raise
        log.warning("database connection lost while recording a failure; reconnecting")
        connection.close()
        return record()


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if str(exc) else text


@shared_task(name="pipelines.tasks.recover_expired_leases")
def recover_expired_leases() -> dict[str, int]:
    """Periodic: hand back rows claimed by workers that died."""
    from pipelines.services.recovery import recover_expired_leases as recover

    return recover()


# --- packaging -----------------------------------------------------------------------------------
@shared_task(name="pipelines.tasks.run_packaging_manager")
def run_packaging_manager() -> dict[str, int]:
    """Periodic: plan packages for the files of finished scans, claim due ones, dispatch builds."""
    return _manager("packaging")


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.build_raw_data_package",
    operation_model=RawDataPackage,
)
def build_raw_data_package(
    self: OperationTask, raw_data_package_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker: tar one claimed package into its site's buffer (``raw_data_package_build``). A
    redelivered task whose claim no longer holds the row does nothing."""
    from pipelines.services.operations import ClaimLost
    from pipelines.services.packaging import raw_data_package_build

    try:
        package = raw_data_package_build(
            raw_data_package_id, token=claim_token, owner=worker_identity()
        )
    except ClaimLost as exc:
        log.info("%s: %s", self.name, exc)
        return {"id": raw_data_package_id, "done": False, "reason": str(exc)}
    return {"id": package.pk, "done": True, "checksum": package.checksum, "size": package.size}


# --- the data path: bundles, transfers, unpacking, long-term archive -----------------------------
def _manager(name: str) -> dict[str, int]:
    from pipelines.managers import manager_tick

    return manager_tick(name, owner=worker_identity())


def _claimed(self: OperationTask, run: Any, row_id: int, token: str) -> dict[str, Any]:
    """Run a claimed row's service; a redelivered task whose claim no longer holds the row
    does nothing."""
    from pipelines.services.operations import ClaimLost

    try:
        run(row_id, token=token, owner=worker_identity())
    except ClaimLost as exc:
        log.info("%s: %s", self.name, exc)
        return {"id": row_id, "done": False, "reason": str(exc)}
    return {"id": row_id, "done": True}


@shared_task(name="pipelines.tasks.run_bundling_manager")
def run_bundling_manager() -> dict[str, int]:
    """Periodic: bundle WAITING packages at the observatories, dispatch the bundle builds."""
    return _manager("bundling")


@shared_task(name="pipelines.tasks.run_transfer_manager")
def run_transfer_manager() -> dict[str, int]:
    """Periodic: create due transfers (primary round-robin, secondary onward), dispatch them."""
    return _manager("transfer")


@shared_task(name="pipelines.tasks.run_unpack_manager")
def run_unpack_manager() -> dict[str, int]:
    """Periodic: dispatch the unpacking of arrived bundles."""
    return _manager("unpack")


@shared_task(name="pipelines.tasks.run_archive_manager")
def run_archive_manager() -> dict[str, int]:
    """Periodic: plan and dispatch long-term archive transfers (seed 003's manager)."""
    return _manager("archive")


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.build_data_transfer_package",
    operation_model=DataTransferPackage,
)
def build_data_transfer_package(
    self: OperationTask, data_transfer_package_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker: tar one claimed bundle of package tars in its buffer."""
    from pipelines.services.transfers import data_transfer_package_build

    return _claimed(self, data_transfer_package_build, data_transfer_package_id, claim_token)


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.transfer_data_transfer_package",
    operation_model=DataTransfer,
)
def transfer_data_transfer_package(
    self: OperationTask, data_transfer_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker: copy one claimed transfer's bundle and read it back at the destination."""
    from pipelines.services.transfers import data_transfer_copy

    return _claimed(self, data_transfer_copy, data_transfer_id, claim_token)


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.unpack_data_transfer",
    operation_model=DataTransfer,
    state_field="unpack_status",
)
def unpack_data_transfer(
    self: OperationTask, data_transfer_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker: unpack one arrived bundle, verifying every package in it."""
    from pipelines.services.transfers import data_transfer_unpack

    return _claimed(self, data_transfer_unpack, data_transfer_id, claim_token)


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.send_data_to_long_term_archive",
    operation_model=LongTermArchiveTransfer,
)
def send_data_to_long_term_archive(
    self: OperationTask, long_term_archive_transfer_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker (seed 003): archive one package and verify it by reading it back."""
    from pipelines.services.archive import long_term_archive_transfer_run

    return _claimed(
        self, long_term_archive_transfer_run, long_term_archive_transfer_id, claim_token
    )


@shared_task(name="pipelines.tasks.process_staging_jobs")
def process_staging_jobs(verbose: bool = False) -> dict[str, int]:
    """Periodic (seed 002): dispatch pending staging jobs to their destination's queue."""
    return _manager("staging")


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.stage_data_task",
    operation_model=StagingJob,
)
def stage_data_task(
    self: OperationTask, staging_job_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker (seed 002): stage one job's packages to its PROCESSING location."""
    from pipelines.services.staging import staging_job_run

    result = _claimed(self, staging_job_run, staging_job_id, claim_token)
    if result["done"]:
        # Workflow runs (issue 11, engine-runs): runs waiting for this job are submitted by the
        # workflow manager's next tick; queue one now instead of waiting for beat.
        from pipelines.services.runs import runs_waiting_for_staging

        if runs_waiting_for_staging(staging_job_id):
            run_workflow_manager.apply_async()
    return result


# --- integrity: re-verification and repair (pipelines/services/integrity.py) ----------------------
@shared_task(name="pipelines.tasks.run_integrity_manager")
def run_integrity_manager() -> dict[str, int]:
    """Periodic: claim copies due for re-verification, dispatch one verification each."""
    return _manager("integrity")


@shared_task(name="pipelines.tasks.run_repair_manager")
def run_repair_manager() -> dict[str, int]:
    """Periodic: claim pending repairs of damaged copies, dispatch them."""
    return _manager("repair")


@shared_task(
    name="pipelines.tasks.verify_physical_copy",
    acks_late=True,
    reject_on_worker_lost=True,
    serializer="json",
)
def verify_physical_copy(physical_copy_id: int, claimed_until: str = "") -> dict[str, Any]:
    """Worker: read one claimed copy back and record the result (``copy_verification_run``).
    Not an operation row: a worker that dies leaves the copy's claim to expire, and the copy is
    due again."""
    from pipelines.services.integrity import copy_verification_run

    result = copy_verification_run(
        physical_copy_id, claimed_until=claimed_until, actor=f"worker:{worker_identity()}"
    )
    return {"id": physical_copy_id, "outcome": result.outcome, "message": result.message}


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.repair_physical_copy",
    operation_model=CopyRepair,
)
def repair_physical_copy(
    self: OperationTask, copy_repair_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker: re-copy one damaged copy from a verified good copy (``copy_repair_run``)."""
    from pipelines.services.integrity import copy_repair_run

    return _claimed(self, copy_repair_run, copy_repair_id, claim_token)


# --- disk monitor and storage audit (pipelines/services/disk.py, audit.py) ------------------------
@shared_task(name="pipelines.tasks.run_disk_manager")
def run_disk_manager() -> dict[str, int]:
    """Periodic: measure every location's usage; a full one stops accepting new data."""
    return _manager("disk")


@shared_task(
    name="pipelines.tasks.audit_storage_location",
    acks_late=True,
    reject_on_worker_lost=True,
    serializer="json",
)
def audit_storage_location(data_location_id: int) -> dict[str, Any]:
    """Worker (on the location's integrity_check queue, where its storage is reachable): audit
    one location's storage against the database (``audit_storage``). Safe to run twice; a
    worker lost mid-audit leaves nothing half done (dark files are upserts, lost copies are
    marked one by one after a re-check)."""
    from pipelines.models import DataLocation
    from pipelines.services.audit import audit_storage

    location = DataLocation.objects.select_related("site").get(pk=data_location_id)
    return audit_storage(location).as_dict()


# --- deletion (pipelines/services/deletion.py) ----------------------------------------------------
@shared_task(name="pipelines.tasks.run_deletion_manager")
def run_deletion_manager() -> dict[str, int]:
    """Periodic: schedule the copies the deletion policy lets go, dispatch their deletions."""
    return _manager("deletion")


@shared_task(
    base=OperationTask,
    bind=True,
    name="pipelines.tasks.delete_physical_copy",
    operation_model=DeletionTask,
)
def delete_physical_copy(
    self: OperationTask, deletion_task_id: int, claim_token: str = ""
) -> dict[str, Any]:
    """Worker: re-judge and delete the copy of one claimed DeletionTask
    (``physical_copy_delete``)."""
    from pipelines.services.deletion import physical_copy_delete

    return _claimed(self, physical_copy_delete, deletion_task_id, claim_token)


# --- trigger manager (issue 11) -----------------------------------------------------------------
@shared_task(name="pipelines.tasks.run_trigger_manager")
def run_trigger_manager() -> dict[str, int]:
    """Periodic: create PENDING runs for the gaps of the served pipelines' steps."""
    return _manager("trigger")


@shared_task(name="pipelines.tasks.evaluate_triggers_now")
def evaluate_triggers_now() -> dict[str, int]:
    """On demand (queued after a package is archived or a run completes, coalesced by
    ``queue_trigger_evaluation``): an incremental trigger evaluation at once."""
    from pipelines.services.triggers import trigger_evaluate_now

    counts = trigger_evaluate_now(owner=worker_identity())
    if counts.get("created"):
        # Workflow runs (issue 11, engine-runs): claim the new runs and start their staging now,
        # not at the workflow manager's next tick.
        _manager("workflow")
    return counts


# --- workflow and result managers, run submission and collection (issue 11, engine-runs) ---------
@shared_task(name="pipelines.tasks.run_workflow_manager")
def run_workflow_manager() -> dict[str, int]:
    """Periodic: claim PENDING runs, stage their inputs, dispatch the submission of staged runs."""
    return _manager("workflow")


@shared_task(name="pipelines.tasks.run_result_manager")
def run_result_manager() -> dict[str, int]:
    """Periodic: poll submitted and running jobs in batches, dispatch collections, retry."""
    return _manager("result")


# --- campaigns (issue 12): backfills and reprocessing ---------------------------------------------
@shared_task(name="pipelines.tasks.run_campaign_manager")
def run_campaign_manager() -> dict[str, int]:
    """Periodic: advance active campaigns (downstream runs, superseded products, progress) and
    refresh product staleness."""
    return _manager("campaign")


def _run_task(run_id: int, claim_token: str, work: Callable[..., Any]) -> dict[str, Any]:
    """A claimed run's worker: ``work(run_id, token=, owner=)``. A redelivered task whose claim
    no longer holds the run does nothing; any error fails the run's attempt (a retry while the
    error is transient and retries are left, for good otherwise)."""
    from pipelines.services.operations import ClaimLost
    from pipelines.services.runs import run_fail_for_exception

    owner = worker_identity()
    try:
        run = work(run_id, token=claim_token, owner=owner)
    except ClaimLost as exc:
        log.info("run %s: %s", run_id, exc)
        return {"id": run_id, "done": False, "reason": str(exc)}
    except Exception as exc:
        log.exception("run %s failed", run_id)
        error: BaseException = exc
        _with_live_connection(
            lambda: bool(
                run_fail_for_exception(run_id, error, token=claim_token, actor=f"worker:{owner}")
            )
        )
        return {"id": run_id, "done": False, "reason": _describe(exc)}
    return {"id": run_id, "done": True, "status": run.status}


@shared_task(
    name="pipelines.tasks.submit_run", acks_late=True, reject_on_worker_lost=True, max_retries=0
)
def submit_run(run_id: int, claim_token: str = "") -> dict[str, Any]:
    """Worker (workflow.hpc): prepare one staged run's attempt and submit it."""
    from pipelines.services.runs import run_submit

    return _run_task(run_id, claim_token, run_submit)


@shared_task(
    name="pipelines.tasks.collect_run_results",
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=0,
)
def collect_run_results(run_id: int, claim_token: str = "") -> dict[str, Any]:
    """Worker (workflow.results): register one finished run's products, complete it and start
    what depends on it."""
    from pipelines.services.results import run_collect_and_advance

    return _run_task(run_id, claim_token, run_collect_and_advance)


@shared_task(name="pipelines.tasks.run_job_finished", acks_late=True, max_retries=0)
def run_job_finished(run_id: int) -> dict[str, Any]:
    """Pushed by a job when it ends (the local backend's wrapper): poll that run's job and
    collect it at once. Safe to repeat and to lose: the result manager's tick polls anyway."""
    from pipelines.services.results import run_collect_now

    return run_collect_now(run_id, owner=worker_identity())


# --- worker heartbeats ---------------------------------------------------------------------------
_worker_heartbeat: Any = None


@worker_ready.connect
def _start_worker_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    """Every worker process keeps ``health:worker:<hostname>`` alive while it runs."""
    from django.conf import settings

    from pipelines.health import HeartbeatThread

    global _worker_heartbeat
    if _worker_heartbeat is not None:
        return
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    ttl = settings.WORKFLOW_HEARTBEAT_TTL
    _worker_heartbeat = HeartbeatThread("worker", hostname, interval=ttl / 3, ttl=ttl)
    _worker_heartbeat.__enter__()


@worker_shutdown.connect
def _stop_worker_heartbeat(**kwargs: Any) -> None:
    global _worker_heartbeat
    if _worker_heartbeat is not None:
        _worker_heartbeat.__exit__(None, None, None)
        _worker_heartbeat = None
