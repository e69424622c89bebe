"""The disk monitor: how full each location is, and whether it still takes new data.

``location_measure_usage`` measures one location and records it (``DataLocation.used_bytes``,
``free_bytes``, ``usage_measured_at`` and a ``DataLocationUsage`` history row);
``disk_monitor_tick`` is the manager (``MANAGERS["disk"]``) that measures every active disk and
S3 location once per ``WORKFLOW_DISK_MONITOR_INTERVAL``.

What "used" means, per kind of location:

- **Disk without ``capacity_bytes``**: the whole file system, as ``df`` reports it (statvfs:
  used = all blocks minus free blocks, free = what an unprivileged writer may still use). On a
  shared file system this counts other users' data too, which is right for the question the
  monitor answers: can we still write here?
- **Disk with ``capacity_bytes``** ("this location may use at most this much of a shared file
  system"): used = the sizes of the location's live copies (every status but DELETED) plus the
  dark files the last storage audit found there, summed in the database (no walk of the tree);
  free = what is left of the allowance, but never more than the file system itself has free.
- **S3**: used = the sum of the object sizes under the location's prefix (one streamed listing);
  with ``capacity_bytes`` (a quota) free = capacity - used, without it there is no percentage
  and the location is never marked full.

The percentage is ``max(used, total - free) / total`` with total = capacity (or used + free for a
whole file system): a location whose allowance is unused but whose file system is full still
reads as full.

Hysteresis: at or above ``high_water_percent`` the location stops accepting writes
(``accepting_writes`` cleared: packaging, transfers, archive transfers and staging choose other
locations or wait; the deletion manager serves it first); below ``cleanup_percent`` it accepts
them again; in between nothing changes, so a location hovering at the mark does not flap.
``accepting_writes`` is not a state field (it has no transition table and no events): each flip
is a warning or info line in the log, and the history is in ``DataLocationUsage``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from pipelines.exceptions import NonRetryableError, StorageUnavailable
from pipelines.models import (
    DarkFile,
    DataLocation,
    DataLocationUsage,
    PhysicalCopy,
    PhysicalCopyStatus,
)
from pipelines.storage.base import storage_for
from pipelines.storage.posix import PosixStorage

log = logging.getLogger(__name__)
ST = DataLocation.StorageType
# Storage types the monitor can measure (tape has no storage backend yet).
MEASURABLE = (ST.DISK, ST.S3)


@dataclass(frozen=True)
class Usage:
    """One measurement before it is stored. ``free`` and ``total`` are None where the storage
    cannot say (S3 without a configured capacity)."""

    used: int
    free: int | None
    total: int | None

    @property
    def percent(self) -> float | None:
        """How full, in percent of ``total`` (may pass 100 when an allowance is overdrawn);
        None without a total."""
        if not self.total:
            return None
        taken = self.used if self.free is None else max(self.used, self.total - self.free)
        return 100.0 * taken / self.total


def location_usage(location: DataLocation) -> Usage:
    """Measure ``location`` now (see the module docstring for what is counted). Raises
    ``StorageUnavailable`` (unreachable root or endpoint) or ``NonRetryableError`` (tape, missing
    configuration or credentials); writes nothing."""
    storage = storage_for(location)
    capacity = location.capacity_bytes
    if location.storage_type == ST.DISK:
        assert isinstance(storage, PosixStorage)
        fs_used, fs_free = storage.filesystem_usage()
        if not capacity:
            return Usage(used=fs_used, free=fs_free, total=fs_used + fs_free)
        used = _registered_bytes(location)
        return Usage(used=used, free=max(0, min(capacity - used, fs_free)), total=capacity)
    # S3: one listing of the prefix, a page of sizes at a time.
    used = sum(item.size for item in storage.list_entries())
    if not capacity:
        return Usage(used=used, free=None, total=None)
    return Usage(used=used, free=max(0, capacity - used), total=capacity)


def _registered_bytes(location: DataLocation) -> int:
    """Bytes the database accounts for at ``location``: its live copies (of each kind, the
    object's size) and its recorded dark files. Two aggregate queries."""
    sums = (
        PhysicalCopy.objects.filter(location=location)
        .exclude(status=PhysicalCopyStatus.DELETED)
        .aggregate(
            files=Sum("raw_data_file__size"),
            packages=Sum("raw_data_package__size"),
            bundles=Sum("data_transfer_package__size"),
            products=Sum("data_product__size_bytes"),
        )
    )
    dark = DarkFile.objects.filter(location=location).aggregate(n=Sum("size_bytes"))["n"]
    return sum(value or 0 for value in sums.values()) + (dark or 0)


def location_measure_usage(
    location: DataLocation, *, now: datetime | None = None
) -> DataLocationUsage:
    """Measure ``location``, store the measurement (the location's ``used_bytes``,
    ``free_bytes`` and ``usage_measured_at``, and a ``DataLocationUsage`` row) and apply the
    hysteresis to ``accepting_writes``, in one transaction. Returns the new usage row; the
    location instance is updated in place. Raises what ``location_usage`` raises, before
    anything is written.

    Only the measured columns and ``accepting_writes`` are written (conditional UPDATEs), so an
    operator's concurrent edit of other fields in the admin is not overwritten."""
    usage = location_usage(location)
    now = now or timezone.now()
    percent = usage.percent
    with transaction.atomic():
        row = DataLocationUsage.objects.create(
            location=location,
            measured_at=now,
            used_bytes=usage.used,
            free_bytes=usage.free,
            total_bytes=usage.total,
        )
        DataLocation.objects.filter(pk=location.pk).update(
            used_bytes=usage.used, free_bytes=usage.free, usage_measured_at=now
        )
        location.used_bytes, location.free_bytes = usage.used, usage.free
        location.usage_measured_at = now
        accepting = _accepting_after(location, percent)
        if accepting is not None:
            _set_accepting_writes(location, accepting, percent)
    return row


def _accepting_after(location: DataLocation, percent: float | None) -> bool | None:
    """The new value of ``accepting_writes`` for ``percent``, or None to leave it."""
    if percent is None:
        return None
    if percent >= location.high_water_percent:
        return False
    if percent < location.cleanup_percent:
        return True
    return None


def _set_accepting_writes(location: DataLocation, accepting: bool, percent: float | None) -> None:
    # Conditional: of two monitors measuring at once only one flips it and logs the flip.
    flipped = DataLocation.objects.filter(pk=location.pk, accepting_writes=not accepting).update(
        accepting_writes=accepting, updated_at=timezone.now()
    )
    location.accepting_writes = accepting
    if not flipped:
        return
    if accepting:
        log.info(
            "disk monitor: %s is %.1f%% full, below its cleanup mark of %d%%: accepting new "
            "packages and transfers again",
            location,
            percent,
            location.cleanup_percent,
        )
    else:
        log.warning(
            "disk monitor: %s is %.1f%% full, at or above its high-water mark of %d%%: no new "
            "packages or transfers go there, and its deletions are served first until it is "
            "below %d%%",
            location,
            percent,
            location.high_water_percent,
            location.cleanup_percent,
        )


# Per process: when each location's last failed measurement was tried, so an unreachable
# location is retried once per interval, not in every round of ``manage.py facility run``.
_last_failure: dict[int, float] = {}


def disk_monitor_tick(*, owner: str, now: datetime | None = None) -> dict[str, int]:
    """The disk monitor manager: measure every active disk and S3 location whose last
    measurement is older than about ``WORKFLOW_DISK_MONITOR_INTERVAL`` (nine tenths of it, so a
    beat that fires a little early still measures). Returns counts: ``stopped_writes`` and
    ``resumed_writes`` (locations whose ``accepting_writes`` flipped) and ``failed`` (locations
    that could not be measured; logged, each retried after an interval). A measurement that
    changes nothing is not counted (it is logged, and kept in ``DataLocationUsage``): the
    runner's ``--until-idle`` reads any non-zero count as work found, and a routine measurement
    must not keep a drained facility busy. Safe to run twice: a second run within the interval
    measures nothing."""
    now = now or timezone.now()
    interval = settings.WORKFLOW_DISK_MONITOR_INTERVAL
    due_before = now - timedelta(seconds=interval * 0.9)
    counts = {"stopped_writes": 0, "resumed_writes": 0, "failed": 0}
    measured = 0
    locations = DataLocation.objects.filter(active=True, storage_type__in=MEASURABLE)
    locations = locations.select_related("site")
    for location in locations.order_by("pk"):
        if location.usage_measured_at is not None and location.usage_measured_at > due_before:
            continue
        failed_at = _last_failure.get(location.pk)
        if failed_at is not None and time.monotonic() - failed_at < interval * 0.9:
            continue
        before = location.accepting_writes
        try:
            location_measure_usage(location, now=now)
        except (StorageUnavailable, NonRetryableError, OSError) as exc:
            _last_failure[location.pk] = time.monotonic()
            log.warning("disk monitor (%s): cannot measure %s: %s", owner, location, exc)
            counts["failed"] += 1
            continue
        _last_failure.pop(location.pk, None)
        measured += 1
        if before and not location.accepting_writes:
            counts["stopped_writes"] += 1
        elif not before and location.accepting_writes:
            counts["resumed_writes"] += 1
    if measured:
        log.info("disk monitor (%s): measured %d location(s)", owner, measured)
    return counts
