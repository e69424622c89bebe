"""Queue names and discovery.

Data-transfer work goes to ``{site.short_name}_{location.name}_{operation}`` queues derived from
Site and DataLocation rows, so a new location brings its queues without a code change; a worker
on a host serves the queues of the locations it can reach. Workflow work goes to the three fixed
``workflow.*`` queues.

Names must be unambiguous. Every part may contain ``_``, so two different locations can spell
the same queue: site ``uni`` + location ``koeln_buffer`` and site ``uni_koeln`` + location
``buffer`` both own ``uni_koeln_buffer_deletion``, and a worker of one would take (and run at
the wrong storage) the other's tasks. Operation names have underscores too, so a location name
ending in the first word of an operation could meet another location's operation the same way.

We keep the SPEC's plain names (``cologne_buffer_deletion``) rather than escape underscores or
change the separator, which would rename every existing queue and make names unreadable, or
forbid ``_`` in site names, which would need a migration and rename sites. Instead a clash is
treated as what it is, two rows that claim one name, and refused where rows are written:

- ``Site.clean()/save()`` and ``DataLocation.clean()/save()`` compute the full names the row
  would own (every operation of its location type) and raise ``ValidationError`` naming the
  other location and its queue if any is already owned by another location, active or not
  (an inactive location can be switched on by a bulk update that skips validation);
- ``discover_queues()`` raises ``QueueNameClash`` naming the queue and both locations when a
  queue it would list has two owners, so a clash that got in anyway (``QuerySet.update``, raw
  SQL, two concurrent saves that each passed the check) stops the affected workers from
  starting rather than letting them share a queue; workers of other locations still start.

``queue_name()`` itself stays a pure function with no query, because it runs on every enqueue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from django.db import models

from pipelines.models import DataLocation

if TYPE_CHECKING:
    from pipelines.models import Site

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
    # A DIRECT route delivers a bundle into an archive, skipping the buffer: it is unpacked
    # there, and sent on to the other archive sites from there.
    _LT.LONG_TERM_ARCHIVE: (
        _OP.LONG_TERM_ARCHIVE_TRANSFER,
        _OP.DATA_TRANSFER,
        _OP.DATA_TRANSFER_UNPACKING,
        _OP.DELETION,
        _OP.INTEGRITY_CHECK,
    ),
    _LT.PROCESSING: (_OP.STAGING, _OP.DELETION, _OP.INTEGRITY_CHECK),
}


class QueueNameClash(Exception):
    """Two locations own the same queue name; a worker of one would take the other's tasks."""


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
    return _join(location.site.short_name, location.name, operation)


def _join(site: str, location: str, operation: str) -> str:
    return f"{site}_{location}_{operation}"


def _names(site: str, location: str, location_type: str) -> list[str]:
    """Every queue a location of that type owns (none for an unknown type)."""
    return [_join(site, location, op) for op in VALID_OPERATIONS.get(location_type, ())]


# (site id, site short name, location id, location name, location type)
_Row = tuple[int, str, int, str, str]


def _rows() -> list[_Row]:
    return list(
        DataLocation.objects.order_by("pk").values_list(
            "site_id", "site__short_name", "pk", "name", "location_type"
        )
    )


def _clashes(mine: set[str], others: Iterable[_Row]) -> dict[str, list[str]]:
    """{other location as "site:name": the names of ``mine`` it already owns}."""
    found: dict[str, list[str]] = defaultdict(list)
    for _site_id, site, _pk, name, location_type in others:
        for queue in _names(site, name, location_type):
            if queue in mine:
                found[f"{site}:{name}"].append(queue)
    return dict(found)


def location_queue_clashes(location: DataLocation) -> dict[str, list[str]]:
    """Queues ``location`` would own as it is in memory (saved or not) that another saved
    location already owns, as {that location as "site:name": [queue, ...]}; empty when none
    (or when the site or type is not set yet: field validation reports those). One query."""
    if location.site_id is None or not location.name:
        return {}
    mine = set(_names(location.site.short_name, location.name, location.location_type))
    if not mine:
        return {}
    # A row with the same site and name is a duplicate, which the unique constraint refuses
    # (and validate_unique reports) with a clearer message than a list of queues.
    others = (
        row
        for row in _rows()
        if row[2] != location.pk and (row[0], row[3]) != (location.site_id, location.name)
    )
    return _clashes(mine, others)


def site_queue_clashes(site: Site) -> dict[str, list[str]]:
    """Queues the locations of ``site`` would own under its in-memory ``short_name`` that a
    location of another site already owns, in the shape of ``location_queue_clashes``. Clashes
    between two locations of the same site do not depend on the site's name and are refused
    when those locations are saved. One query; none for an unsaved site (it has no locations).
    """
    if site.pk is None or not site.short_name:
        return {}
    rows = _rows()
    mine = {
        queue
        for site_id, _short, _pk, name, location_type in rows
        if site_id == site.pk
        for queue in _names(site.short_name, name, location_type)
    }
    # Another site with the same short name is a duplicate for the unique constraint.
    others = (row for row in rows if row[0] != site.pk and row[1] != site.short_name)
    return _clashes(mine, others) if mine else {}


def describe_clashes(clashes: dict[str, list[str]]) -> list[str]:
    """One sentence per other location, for a ValidationError."""
    return [
        (
            f"queue {queues[0]} already belongs"
            if len(queues) == 1
            else f"queues {', '.join(sorted(queues))} already belong"
        )
        + f" to location {other}; choose a site short name and location name that spell "
        "different queue names"
        for other, queues in sorted(clashes.items())
    ]


def discover_queues(
    *,
    site: str | None = None,
    location_ids: list[int] | None = None,
    include_workflow: bool = False,
) -> list[str]:
    """All queues of the active locations (optionally of one site or some locations), sorted.

    ``celery -A workflow_site worker -Q $(python manage.py queues --site cologne)`` starts a
    worker for everything a host at that site can reach.

    Raises QueueNameClash, naming the queue and every location that owns it, when a selected
    queue is also owned by another location (of any site, active or not): a worker started on
    that list would take the other location's tasks. Workers whose queues are all unambiguous
    still start, so a bad row at one site does not stop the others.
    """
    rows = _rows()
    owners: dict[str, list[str]] = defaultdict(list)
    for _site_id, short, pk, name, location_type in rows:
        for queue in _names(short, name, location_type):
            owners[queue].append(f"{short}:{name} (id {pk})")
    qs = DataLocation.objects.filter(active=True)
    if site:
        qs = qs.filter(site__short_name=site)
    if location_ids:
        qs = qs.filter(pk__in=location_ids)
    selected = set(qs.values_list("pk", flat=True))
    names = {
        queue
        for _site_id, short, pk, name, location_type in rows
        if pk in selected
        for queue in _names(short, name, location_type)
    }
    clashes = sorted((queue, owners[queue]) for queue in names if len(owners[queue]) > 1)
    if clashes:
        detail = "; ".join(f"{queue!r} belongs to {' and '.join(who)}" for queue, who in clashes)
        raise QueueNameClash(
            f"ambiguous queue names: {detail}. Rename one of each pair (Site.short_name or "
            "DataLocation.name) before starting a worker on them."
        )
    if include_workflow:
        names.update(WORKFLOW_QUEUES)
    return sorted(names)


# Fixed routes by task name, each naming a registered task (tested); per-row data-transfer tasks
# pass their queue at enqueue time. The workflow tasks (staging, submission, results) add their
# routes to workflow.staging/hpc/results when they are written.
TASK_ROUTES: dict[str, str] = {
    # The lease reconciler is periodic like the managers and runs with them.
    "pipelines.tasks.recover_expired_leases": MANAGERS_QUEUE,
    # Trigger manager (issue 11): the on-demand evaluation runs with the periodic managers.
    "pipelines.tasks.evaluate_triggers_now": MANAGERS_QUEUE,
    # Workflow runs (issue 11, engine-runs): submission to the HPC backend, then collection
    # (the tick's dispatch and the job's own completion push).
    "pipelines.tasks.submit_run": HPC_QUEUE,
    "pipelines.tasks.collect_run_results": RESULTS_QUEUE,
    "pipelines.tasks.run_job_finished": RESULTS_QUEUE,
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
