"""New data avoids full locations: every planner that picks where bytes go next passes over a
location the disk monitor marked as not accepting writes (packaging, transfers, long-term
archive, staging), falling over to the next one by priority as for an inactive location."""

from __future__ import annotations

import pytest

from pipelines.exceptions import StorageUnavailable
from pipelines.models import (
    DataLocation,
    DataTransfer,
    LongTermArchiveTransfer,
    PhysicalCopy,
    StagingJob,
    Status,
)
from pipelines.services.archive import long_term_archive_transfers_plan
from pipelines.services.packaging import package_buffer
from pipelines.services.staging import process_staging_jobs
from pipelines.services.transfers import data_transfers_plan, route_destination
from tests import factories as f

pytestmark = pytest.mark.django_db
LT = DataLocation.LocationType


def close(location: DataLocation) -> None:
    """What the disk monitor does to a location past its high-water mark."""
    DataLocation.objects.filter(pk=location.pk).update(accepting_writes=False)
    location.refresh_from_db()


def test_a_full_buffer_gets_no_new_packages_the_next_buffer_of_the_site_does() -> None:
    site = f.SiteFactory(short_name="obs")
    source = f.DataLocationFactory(site=site, name="instrument", location_type=LT.SOURCE)
    first = f.DataLocationFactory(site=site, name="buffer", location_type=LT.BUFFER, priority=10)
    spare = f.DataLocationFactory(site=site, name="spare", location_type=LT.BUFFER, priority=5)
    assert package_buffer(source) == first

    close(first)
    assert package_buffer(source) == spare

    close(spare)
    with pytest.raises(StorageUnavailable, match="no active BUFFER location accepting writes"):
        package_buffer(source)


def test_a_transfer_goes_to_the_next_buffer_when_the_first_is_full() -> None:
    destination = f.SiteFactory(short_name="cologne")
    first = f.DataLocationFactory(site=destination, name="buffer", priority=10)
    spare = f.DataLocationFactory(site=destination, name="spare", priority=5)
    route = f.DataTransferRouteFactory(destination_site=destination, is_primary=True)
    assert route_destination(route) == first
    close(first)
    assert route_destination(route) == spare
    close(spare)
    with pytest.raises(StorageUnavailable, match="no active buffer location accepting writes"):
        route_destination(route)


def test_a_transfer_to_a_full_explicit_destination_waits() -> None:
    target = f.DataLocationFactory(name="buffer")
    route = f.DataTransferRouteFactory(destination_site=target.site, destination_location=target)
    assert route_destination(route) == target
    close(target)
    route.refresh_from_db()
    with pytest.raises(StorageUnavailable, match="not accepting writes"):
        route_destination(route)


def test_no_transfer_is_planned_to_a_site_whose_buffers_are_all_full() -> None:
    observatory = f.SiteFactory(short_name="obs")
    buffer = f.DataLocationFactory(site=observatory, name="buffer")
    archive_site = f.SiteFactory(short_name="cologne")
    full = f.DataLocationFactory(site=archive_site, name="buffer")
    f.DataTransferRouteFactory(
        origin_site=observatory, destination_site=archive_site, is_primary=True
    )
    f.DataTransferPackageFactory(origin_location=buffer, status=Status.COMPLETED)
    close(full)

    assert data_transfers_plan() == 0
    assert not DataTransfer.objects.exists()

    # Once deletions freed it and the monitor reopened it, the bundle leaves.
    DataLocation.objects.filter(pk=full.pk).update(accepting_writes=True)
    assert data_transfers_plan() == 1
    assert DataTransfer.objects.get().destination_location == full


def test_archive_transfers_are_planned_only_into_archives_accepting_writes() -> None:
    site = f.SiteFactory(short_name="cologne")
    buffer = f.DataLocationFactory(site=site, name="buffer")
    full = f.DataLocationFactory(site=site, name="lta", location_type=LT.LONG_TERM_ARCHIVE)
    open_ = f.DataLocationFactory(site=site, name="lta2", location_type=LT.LONG_TERM_ARCHIVE)
    f.PhysicalCopyFactory(location=buffer, integrity=PhysicalCopy.Integrity.VERIFIED)
    close(full)

    assert long_term_archive_transfers_plan() == 1
    [transfer] = LongTermArchiveTransfer.objects.all()
    assert transfer.destination_location == open_


def test_a_staging_job_to_a_full_processing_location_stays_pending_until_it_is_reopened() -> None:
    job = f.StagingJobFactory()
    close(job.destination_location)

    assert process_staging_jobs(owner="test") == {"claimed": 0}
    job.refresh_from_db()
    assert job.status == Status.PENDING

    DataLocation.objects.filter(pk=job.destination_location_id).update(accepting_writes=True)
    assert process_staging_jobs(owner="test") == {"claimed": 1}
    assert StagingJob.objects.get(pk=job.pk).status == Status.SCHEDULED
