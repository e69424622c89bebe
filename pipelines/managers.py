"""The managers: periodic ticks that find due work and dispatch it (never do long I/O).

A literal registry, name -> dotted path of the tick service, called as ``tick(owner=...)`` and
returning counts (any non-zero count means the tick found work). Beat fires them through the
``run_<name>_manager`` tasks (``CELERY_BEAT_SCHEDULE``); ``manage.py facility run`` calls
``manager_tick`` directly so it can tell when a round found nothing.
"""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string

MANAGERS: dict[str, str] = {
    "packaging": "pipelines.services.packaging.packaging_manager_tick",
    "bundling": "pipelines.services.transfers.bundling_manager_tick",
    "transfer": "pipelines.services.transfers.transfer_manager_tick",
    "unpack": "pipelines.services.transfers.unpack_manager_tick",
    "archive": "pipelines.services.archive.archive_manager_tick",
    "staging": "pipelines.services.staging.staging_manager_tick",
    # Integrity (issue 10): re-verify copies whose interval passed; repair damaged copies.
    "integrity": "pipelines.services.integrity.integrity_manager_tick",
    "repair": "pipelines.services.integrity.repair_manager_tick",
    # Disk monitor (issue 10): measure usage; a full location stops taking new data.
    "disk": "pipelines.services.disk.disk_monitor_tick",
    # Deletion (issue 10): schedule copies the policy lets go, dispatch their deletions.
    "deletion": "pipelines.services.deletion.deletion_manager_tick",
    # Trigger manager (issue 11): PENDING runs for the gaps of the served pipelines' steps.
    "trigger": "pipelines.services.triggers.trigger_manager_tick",
    # Workflow and result managers (issue 11, engine-runs): claim, stage and submit runs; poll
    # their jobs, collect products, retry failed runs.
    "workflow": "pipelines.services.runs.workflow_manager_tick",
    "result": "pipelines.services.results.result_manager_tick",
    # Campaigns (issue 12): advance backfills and reprocessing (downstream runs once their
    # upstream completed, superseded products, progress), and refresh product staleness.
    "campaign": "pipelines.services.campaigns.campaign_manager_tick",
}

# Managers beat fires on another schedule than WORKFLOW_MANAGER_INTERVAL: the setting holding
# their interval, so /health measures their lag against the right period.
MANAGER_INTERVAL_SETTINGS: dict[str, str] = {
    "disk": "WORKFLOW_DISK_MONITOR_INTERVAL",  # disk monitor (issue 10)
}


def manager_tick(name: str, *, owner: str) -> dict[str, int]:
    """Run one tick of manager ``name`` and record its heartbeat (with the counts, so
    ``/health`` shows what it last found). Raises whatever the tick raises, after no heartbeat:
    a manager that keeps failing shows up as lagging."""
    from pipelines.health import heartbeat

    counts = dict(import_string(MANAGERS[name])(owner=owner))
    heartbeat(
        "manager",
        name,
        interval=getattr(
            settings, MANAGER_INTERVAL_SETTINGS.get(name, "WORKFLOW_MANAGER_INTERVAL")
        ),
        counts=counts,
        ttl=settings.WORKFLOW_HEARTBEAT_TTL,
    )
    return counts
