"""The result manager: from a submitted job to a completed run with registered products.

``result_manager_tick`` (MANAGERS["result"]) asks the backend for the status of every SUBMITTED
or RUNNING run of this processing location, one ``get_status`` call per batch (runs in any other
state are never polled, behaviour 40), and applies the answer (``run_apply_status``):

- ``pending``: nothing;
- ``running``: SUBMITTED -> RUNNING;
- ``completed``: (-> RUNNING) -> COLLECTING_RESULTS under a new claim token and a lease, with the
  job's metrics (exit code, wall time, CPU hours, peak memory), and one ``collect_run_results``
  task on ``workflow.results``;
- ``failed``: FAILED with the job's reason, metrics and the tail of its logs.

``run_collect`` registers the attempt's outputs: files under ``output/science``, ``qa``,
``plots``, ``statistics`` and ``logs`` become SCIENCE, QA_METRIC, PLOT, STATISTICS and LOG
products and files under ``workspace/<step>/`` INTERMEDIATE ones, each with its checksum and
a verified PhysicalCopy at the processing location. All files are hashed first, then every
product, copy and the move to COMPLETED are written in ONE transaction conditional on the claim
token: a worker that dies while collecting leaves nothing registered, its lease runs out, the
tick claims the run again and collects it once (``runs_reclaim_collection``). An error while
collecting fails the run (behaviour 37).

Lineage: a product's ``produced_by`` run holds ``input_raw_packages`` and ``input_products``,
so ``product_raw_packages`` walks any product back to the raw data it came from.

The tick then retries failed runs that have retries left (``run_retry_due``). The task that
completes a run (``collect_run_results``, or ``run_job_finished``, the local backend's push,
which collects one run at once) then evaluates that run's downstream steps and ticks the
workflow manager (``advance_downstream``), so they start without waiting for the next tick.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from pipelines.exceptions import NonRetryableError
from pipelines.faults import pause_point
from pipelines.models import (
    DataProduct,
    DataProductType,
    ExecutedReductionStep,
    PhysicalCopy,
    RawDataPackage,
    RunStatus,
)
from pipelines.storage.checksums import checksum_and_size

from .copies import copy_register_verified
from .operations import ClaimLost, abandoned_claim, new_claim_token
from .runs import (
    RunLeaseKeeper,
    attempt_entry,
    run_fail,
    run_lease_expiry,
    run_release_staging,
    run_retry_due,
    served_runs,
)
from .states import TransitionConflict, transition

if TYPE_CHECKING:
    from pipelines.backends.base import Backend, JobStatus

log = logging.getLogger(__name__)

POLLED_STATUSES = (RunStatus.SUBMITTED, RunStatus.RUNNING)
# Output subdirectory -> product type (the container contract).
OUTPUT_TYPES: dict[str, str] = {
    "science": DataProductType.SCIENCE,
    "qa": DataProductType.QA_METRIC,
    "plots": DataProductType.PLOT,
    "statistics": DataProductType.STATISTICS,
    "logs": DataProductType.LOG,
}
LOG_TAIL_BYTES = 4000
_GB = 1024**3


def result_manager_tick(*, owner: str, batch_size: int = 500) -> dict[str, int]:
    """One tick (MANAGERS["result"]): poll the served SUBMITTED/RUNNING runs in batches of
    ``batch_size`` (one backend call each), re-claim collections whose worker died, retry failed
    runs with retries left. Returns counts (any non-zero: the tick found work; ``polled`` alone
    does not count as work when nothing changed, see the keys below)."""
    from pipelines.backends.base import get_backend

    backend = get_backend()
    counts = {"running": 0, "collecting_results": 0, "failed": 0}
    polled = 0
    last_pk = 0
    while True:
        batch = list(
            served_runs()
            .filter(status__in=POLLED_STATUSES, pk__gt=last_pk)
            .exclude(hpc_job_id="")
            .order_by("pk")[:batch_size]
        )
        if not batch:
            break
        last_pk = batch[-1].pk
        statuses = backend.get_status([run.hpc_job_id for run in batch])
        polled += len(batch)
        for run in batch:
            try:
                outcome = run_apply_status(run, statuses.get(run.hpc_job_id), owner=owner,
                                           backend=backend)  # fmt: skip
            except Exception:
                # One bad run must not stop the others (behaviour 48); it is polled again.
                log.exception("result manager: run %s could not be updated", run.pk)
                continue
            if outcome.state in counts:
                counts[outcome.state] += 1
        if len(batch) < batch_size:
            break
    counts["recollecting"] = runs_reclaim_collection(owner=owner)
    counts["retried"] = run_retry_due(actor=f"manager:{owner}")
    counts["active"] = polled
    return counts


@dataclass(frozen=True)
class Applied:
    """What ``run_apply_status`` did: the state it moved the run to (or "" when nothing
    changed) and, for a run now COLLECTING_RESULTS, the claim token its collector must hold."""

    state: str = ""
    token: str = ""


def run_apply_status(
    run: ExecutedReductionStep,
    status: JobStatus | None,
    *,
    owner: str,
    backend: Backend,
    dispatch: bool = True,
) -> Applied:
    """Apply one job status to a SUBMITTED/RUNNING run (module docstring). Every move is
    conditional on the run still being in the state read with the same job id, so a run
    cancelled or collected meanwhile is left alone. With ``dispatch`` a run moved to
    COLLECTING_RESULTS gets a ``collect_run_results`` task after commit; without, the caller
    collects it with the returned token."""
    if status is None or status.state == "pending":
        return Applied()
    actor = f"manager:{owner}"
    where = {"hpc_job_id": run.hpc_job_id}
    started = status.started_at or timezone.now()
    if status.state in ("running", "completed") and run.status == RunStatus.SUBMITTED:
        try:
            transition(
                run,
                RunStatus.RUNNING,
                actor=actor,
                reason=f"job {run.hpc_job_id} is running",
                where=where,
                updates={"started_at": started},
            )
        except TransitionConflict:
            return Applied()
        if status.state == "running":
            return Applied(RunStatus.RUNNING)
    if status.state == "running":
        return Applied()
    metrics = _metrics(status)
    if status.state == "failed":
        reason = f"job {run.hpc_job_id} failed: {status.reason or 'no reason given'}"
        tail = _log_tail(backend, run.hpc_job_id)
        if tail:
            reason += f"\n--- log tail ---\n{tail}"
        moved = run_fail(
            run.pk, token=None, reason=reason, actor=actor, updates=metrics, where=where
        )
        return Applied(RunStatus.FAILED if moved else "")
    token = new_claim_token()
    try:
        transition(
            run,
            RunStatus.COLLECTING_RESULTS,
            actor=actor,
            reason=f"job {run.hpc_job_id} completed (exit code {status.exit_code})",
            where=where,
            updates={
                **metrics,
                "claim_token": token,
                "lease_owner": owner[:200],
                "lease_expires_at": run_lease_expiry(),
            },
        )
    except TransitionConflict:
        return Applied()
    if dispatch:
        _dispatch_collection(run.pk, token)
    return Applied(RunStatus.COLLECTING_RESULTS, token)


def _metrics(status: JobStatus) -> dict[str, Any]:
    """The run's metric columns from a job status (only those the backend measured)."""
    values: dict[str, Any] = {"exit_code": status.exit_code}
    if status.wall_seconds is not None:
        values["wall_time_seconds"] = round(status.wall_seconds, 3)
    if status.cpu_seconds is not None:
        values["cpu_hours"] = status.cpu_seconds / 3600
    if status.peak_memory_bytes is not None:
        values["peak_memory_gb"] = status.peak_memory_bytes / _GB
    return values


def _log_tail(backend: Backend, job_id: str) -> str:
    try:
        return backend.get_logs(job_id, tail_bytes=LOG_TAIL_BYTES)[-LOG_TAIL_BYTES:]
    except Exception as exc:
        return f"(logs not readable: {exc})"


def _dispatch_collection(pk: int, token: str) -> None:
    from pipelines.queues import RESULTS_QUEUE
    from pipelines.tasks import collect_run_results

    def enqueue() -> None:
        try:
            collect_run_results.apply_async(
                args=(pk,), kwargs={"claim_token": token}, queue=RESULTS_QUEUE
            )
        except Exception:
            # Left COLLECTING_RESULTS under a lease that runs out; the tick re-claims it.
            log.exception("could not enqueue the collection of run %s", pk)

    transaction.on_commit(enqueue)


def runs_reclaim_collection(*, owner: str, limit: int = 200) -> int:
    """COLLECTING_RESULTS runs whose collector died (lease expired, or no lease and unchanged
    for a lease period): a new claim token and lease, and their collection dispatched again.
    Conditional on the same abandoned claim, so two ticks re-claim a run once. Returns how many
    were re-claimed."""
    from datetime import timedelta

    from django.conf import settings
    from django.db.models import Q

    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.WORKFLOW_LEASE_SECONDS)
    runs = list(
        served_runs()
        .filter(
            Q(lease_expires_at__lt=now) | Q(lease_expires_at__isnull=True, updated_at__lt=cutoff),
            status=RunStatus.COLLECTING_RESULTS,
        )
        .order_by("pk")[:limit]
    )
    reclaimed = 0
    for run in runs:
        reason, where = abandoned_claim(run, now)
        token = new_claim_token()
        moved = ExecutedReductionStep.objects.filter(
            pk=run.pk, status=RunStatus.COLLECTING_RESULTS, **where
        ).update(
            claim_token=token,
            lease_owner=owner[:200],
            lease_expires_at=run_lease_expiry(),
            updated_at=now,
        )
        if moved:
            log.warning("run %s: collection abandoned (%s); collecting again", run.pk, reason)
            _dispatch_collection(run.pk, token)
            reclaimed += 1
    return reclaimed


# --- collection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """One file an attempt left for registration."""

    relative_path: str  # below the attempt directory, e.g. "output/science/cube.npy"
    product_type: str
    checksum: str
    size: int


def run_collect(run_id: int, *, token: str, owner: str) -> ExecutedReductionStep:
    """Register the outputs of a COLLECTING_RESULTS run held by ``token`` and complete it
    (module docstring). Its callers then start what depends on it (``advance_downstream``).
    Returns the COMPLETED run.
    Raises ``ClaimLost`` when the claim no longer holds the run (nothing written); any other
    error is left to the caller, which fails the run (``run_fail_for_exception``)."""
    run = ExecutedReductionStep.objects.select_related(
        "reduction_step__pipeline__processing_location"
    ).get(pk=run_id)
    if run.status != RunStatus.COLLECTING_RESULTS or not token or run.claim_token != token:
        raise ClaimLost(
            f"run {run_id} is {run.status} under claim {run.claim_token[:8] or '-'}, "
            f"not collecting_results under {token[:8] or '-'}"
        )
    location = run.reduction_step.pipeline.processing_location
    root = Path(location.root_path)
    run_dir = Path(run.run_dir)
    if not run.run_dir or not run_dir.is_dir():
        raise NonRetryableError(f"run {run.pk}: attempt directory {run.run_dir!r} is missing")
    try:
        base = run_dir.relative_to(root)
    except ValueError:
        raise NonRetryableError(
            f"run {run.pk}: {run_dir} is not inside the processing location root {root}"
        ) from None
    actor = f"worker:{owner}"
    with RunLeaseKeeper(run.pk, token=token, status=RunStatus.COLLECTING_RESULTS) as keeper:
        outputs = []
        for relative, product_type in discover_outputs(run_dir, run.reduction_step.name):
            keeper.check()
            checksum, size = checksum_and_size(run_dir / relative, location.checksum_algorithm)
            outputs.append(Output(relative, product_type, checksum, size))
        quality = _quality_metrics(run_dir, outputs)
        pause_point("results.before_register")
        keeper.check()
        with transaction.atomic():
            for output in outputs:
                product = _product(run, output, location.checksum_algorithm, quality)
                copy_register_verified(
                    product,
                    kind=PhysicalCopy.Kind.DATA_PRODUCT,
                    location=location,
                    relative_path=str(base / output.relative_path),
                    checksum=output.checksum,
                    actor=actor,
                    reason=f"output of run {run.pk}",
                )
            entry = attempt_entry(
                run, outcome="completed", exit_code=run.exit_code, products=len(outputs)
            )
            try:
                transition(
                    run,
                    RunStatus.COMPLETED,
                    actor=actor,
                    reason=f"{len(outputs)} product(s) registered",
                    where={"claim_token": token},
                    updates={
                        "claim_token": "",
                        "lease_owner": "",
                        "lease_expires_at": None,
                        "finished_at": timezone.now(),
                        "failure_reason": "",
                        "attempts": [*run.attempts, entry],
                    },
                )
            except TransitionConflict as exc:
                raise ClaimLost(f"run {run.pk}: claim lost while collecting ({exc})") from exc
            run_release_staging(run)
    return run


def discover_outputs(run_dir: Path, step_name: str) -> list[tuple[str, str]]:
    """(path below ``run_dir``, product type) of every file to register, sorted: the typed
    ``output/`` subdirectories and ``workspace/<step_name>/`` (intermediates). Files elsewhere
    are not products of this run and are skipped: the top of ``output/`` and unknown
    subdirectories (outside the contract), the inputs, and the backend's own ``logs/`` (still
    written by the backend after the job's end, so no checksum of them would hold; the run's
    ``log_path`` points there)."""
    found: list[tuple[str, str]] = []
    for subdir, product_type in OUTPUT_TYPES.items():
        found += _files(run_dir, Path("output") / subdir, product_type)
    found += _files(run_dir, Path("workspace") / step_name, DataProductType.INTERMEDIATE)
    return found


def _files(run_dir: Path, subdir: Path, product_type: str) -> list[tuple[str, str]]:
    top = run_dir / subdir
    if not top.is_dir():
        return []
    return [
        (str(path.relative_to(run_dir)), product_type)
        for path in sorted(top.rglob("*"))
        if path.is_file() and not path.is_symlink()
    ]


def _quality_metrics(run_dir: Path, outputs: list[Output]) -> dict[str, Any]:
    """The run's quality metrics: the JSON object in its QA ``metrics.json`` (output/qa or the
    step's workspace qa/), or {}."""
    for output in outputs:
        if Path(output.relative_path).name == "metrics.json":
            try:
                value = json.loads((run_dir / output.relative_path).read_text())
            except (OSError, ValueError):
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def _product(
    run: ExecutedReductionStep, output: Output, algorithm: str, quality: dict[str, Any]
) -> DataProduct:
    """The product row of ``output``: created, or (a collection repeated after its worker died
    between registering and committing, which the transaction makes impossible, or an operator
    re-collecting) brought up to date."""
    values = {
        "product_type": output.product_type,
        "filename": Path(output.relative_path).name,
        "size_bytes": output.size,
        "checksum": output.checksum,
        "checksum_algorithm": algorithm,
        "quality_metrics": quality
        if output.product_type in (DataProductType.SCIENCE, DataProductType.QA_METRIC)
        else {},
    }
    product, created = DataProduct.objects.get_or_create(
        produced_by=run, relative_path=output.relative_path, defaults=values
    )
    if not created:
        for key, value in values.items():
            setattr(product, key, value)
        product.save()
    return product


def run_collect_now(run_id: int, *, owner: str) -> dict[str, Any]:
    """The pushed completion (``run_job_finished``): poll this one run and, when its job has
    completed, collect it in this worker at once. A run not SUBMITTED/RUNNING (collected by the
    tick already, cancelled, not yet marked submitted) is left to the managers."""
    from pipelines.backends.base import get_backend

    run = ExecutedReductionStep.objects.filter(pk=run_id).first()
    if run is None or run.status not in POLLED_STATUSES or not run.hpc_job_id:
        return {"id": run_id, "done": False, "status": run.status if run else "missing"}
    backend = get_backend()
    status = backend.get_status([run.hpc_job_id]).get(run.hpc_job_id)
    applied = run_apply_status(run, status, owner=owner, backend=backend, dispatch=False)
    if applied.state == RunStatus.COLLECTING_RESULTS:
        from .runs import run_fail_for_exception

        try:
            run_collect(run_id, token=applied.token, owner=owner)
        except ClaimLost as exc:
            log.info("run %s: %s", run_id, exc)
        except Exception as exc:
            log.exception("collecting run %s failed", run_id)
            run_fail_for_exception(run_id, exc, token=applied.token, actor=f"worker:{owner}")
        else:
            advance_downstream(run_id, owner=owner)
    run.refresh_from_db(fields=["status"])
    return {"id": run_id, "done": True, "status": run.status}


def run_collect_and_advance(run_id: int, *, token: str, owner: str) -> ExecutedReductionStep:
    """The collection task's work (``collect_run_results``, the polled path): ``run_collect``,
    then the run's downstream steps evaluated and the workflow manager ticked in the same task,
    as the pushed completion does (``advance_downstream``), instead of queueing an evaluation
    of every served pipeline."""
    run = run_collect(run_id, token=token, owner=owner)
    advance_downstream(run_id, owner=owner)
    return run


def advance_downstream(run_id: int, *, owner: str) -> None:
    """Right after run ``run_id`` completed in this worker: evaluate its downstream steps (they
    may have a gap now; only those, not every served pipeline) and tick the workflow manager
    (claim the runs that created and dispatch their submission), so a chain of steps advances
    at the pace of its jobs, not of the managers' ticks. Best effort: an error is logged, and
    the periodic ticks do the same work."""
    from .runs import workflow_manager_tick
    from .triggers import trigger_evaluate_downstream

    try:
        created = trigger_evaluate_downstream([run_id], owner=owner)
        workflow_manager_tick(owner=owner)
    except Exception:
        log.exception("advancing the steps downstream of a completed run failed")
        return
    log.debug("downstream of a completed run: %s", created)


# --- lineage -------------------------------------------------------------------------------------
def product_raw_packages(product: DataProduct) -> QuerySet[RawDataPackage]:
    """Every raw data package ``product`` was made from: its run's input packages and, through
    its run's input products, theirs, recursively (one query per level of the DAG)."""
    package_ids: set[int] = set()
    runs = {product.produced_by_id}
    seen: set[int] = set()
    while runs:
        seen |= runs
        package_ids |= set(
            ExecutedReductionStep.input_raw_packages.through.objects.filter(
                executedreductionstep_id__in=runs
            ).values_list("rawdatapackage_id", flat=True)
        )
        upstream = set(
            DataProduct.objects.filter(consumer_runs__in=runs).values_list(
                "produced_by_id", flat=True
            )
        )
        runs = upstream - seen
    return RawDataPackage.objects.filter(pk__in=package_ids)
