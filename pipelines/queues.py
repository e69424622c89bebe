"""Queue names and discovery.

Data-transfer work goes to ``{site.short_name}_{location.name}_{operation}`` queues derived from
Site and DataLocation rows, so a new location brings its queues without a code change; a worker
on a host serves the queues of the locations it can reach. Workflow work goes to the three fixed
``workflow.*`` queues.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from pipelines.models import DataLocation

STAGING_QUEUE = "workflow.staging"
HPC_QUEUE = "workflow.hpc"
RESULTS_QUEUE = "workflow.results"
MANAGERS_QUEUE = "workflow.managers"
DEFAULT_QUEUE = "workflow.default"
WORKFLOW_QUEUES = (STAGING_QUEUE, HPC_QUEUE, RESULTS_QUEUE)


class OperationType(models.TextChoices):
    RAW_DATA_PACKAGE_CREATION = "raw_data_package_creation", "Raw data package creation"
    DATA_TRANSFER_PACKAGE_CREATION = "data_transfer_package_creation", "Transfer bundle creation"
    DATA_TRANSFER = "data_transfer", "Data transfer"
    DATA_TRANSFER_UNPACKING = "data_transfer_unpacking", "Unpacking"
    LONG_TERM_ARCHIVE_TRANSFER = "long_term_archive_transfer", "Long-term archive transfer"
    STAGING = "staging", "Staging"
    DELETION = "deletion", "Deletion"
    INTEGRITY_CHECK = "integrity_check", "Integrity check"


_LT = DataLocation.LocationType
_OP = OperationType
# Which operations a worker performs *at* a location of each type.
VALID_OPERATIONS: dict[str, tuple[str, ...]] = {
    _LT.SOURCE: (_OP.RAW_DATA_PACKAGE_CREATION, _OP.DELETION, _OP.INTEGRITY_CHECK),
    _LT.BUFFER: (
        _OP.DATA_TRANSFER_PACKAGE_CREATION,
        _OP.DATA_TRANSFER,
        _OP.DATA_TRANSFER_UNPACKING,
        _OP.DELETION,
        _OP.INTEGRITY_CHECK,
    ),
    _LT.LONG_TERM_ARCHIVE: (_OP.LONG_TERM_ARCHIVE_TRANSFER, _OP.DELETION, _OP.INTEGRITY_CHECK),
    _LT.PROCESSING: (_OP.STAGING, _OP.DELETION, _OP.INTEGRITY_CHECK),
}


def queue_name(location: DataLocation, operation: str) -> str:
    """The queue a worker task for ``operation`` at ``location`` goes to.

    Raises ValueError when the operation makes no sense at that kind of location, so a
    misrouted task fails when it is enqueued, not silently on a queue nobody serves.
    """
    if operation not in VALID_OPERATIONS[location.location_type]:
        raise ValueError(
            f"operation {operation!r} is not performed at {location.location_type} location "
            f"{location}; valid: {', '.join(VALID_OPERATIONS[location.location_type])}"
        )
    return f"{location.site.short_name}_{location.name}_{operation}"


def discover_queues(
    *,
    site: str | None = None,
    location_ids: list[int] | None = None,
    include_workflow: bool = False,
) -> list[str]:
    """All queues of the active locations (optionally of one site or some locations), sorted.

    ``celery -A workflow_site worker -Q $(python manage.py queues --site cologne)`` starts a
    worker for everything a host at that site can reach.
    """
    qs = DataLocation.objects.filter(active=True).select_related("site")
    if site:
        qs = qs.filter(site__short_name=site)
    if location_ids:
        qs = qs.filter(pk__in=location_ids)
    names = {queue_name(loc, op) for loc in qs for op in VALID_OPERATIONS[loc.location_type]}
    if include_workflow:
        names.update(WORKFLOW_QUEUES)
    return sorted(names)


# Fixed routes by task name; per-row data-transfer tasks pass their queue at enqueue time.
TASK_ROUTES: dict[str, str] = {
    "pipelines.tasks.stage_run_inputs": STAGING_QUEUE,
    "pipelines.tasks.submit_run": HPC_QUEUE,
    "pipelines.tasks.collect_run_results": RESULTS_QUEUE,
    "pipelines.tasks.run_completed": RESULTS_QUEUE,
}


def route_task(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **kw: Any
) -> dict[str, str] | None:
    """Celery router (``task_routes``): an explicit ``queue=`` wins; then the fixed table;
    managers go to ``workflow.managers``; anything else to the default queue."""
    if options.get("queue"):
        return None
    if name in TASK_ROUTES:
        return {"queue": TASK_ROUTES[name]}
    if name.startswith("pipelines.tasks.run_") and name.endswith("_manager"):
        return {"queue": MANAGERS_QUEUE}
    return {"queue": DEFAULT_QUEUE}
