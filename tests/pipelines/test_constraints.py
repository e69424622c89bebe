"""The database itself refuses bad states and inconsistent rows, whoever writes them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction

from pipelines import models as m
from pipelines.models.events import AppendOnlyError
from tests import factories as f

pytestmark = pytest.mark.django_db


def _rejected(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IntegrityError), transaction.atomic():
        fn()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (f.RawDataPackageFactory, "status"),
        (f.RawDataPackageFactory, "state"),
        (f.DataTransferPackageFactory, "status"),
        (f.PhysicalCopyFactory, "status"),
        (f.PhysicalCopyFactory, "integrity"),
        (f.DataTransferFactory, "status"),
        (f.LongTermArchiveTransferFactory, "status"),
        (f.StagingJobFactory, "status"),
        (f.DeletionTaskFactory, "status"),
        (f.ExecutedReductionStepFactory, "status"),
        (f.ExecutedObsUnitFactory, "status"),
        (f.DataLocationFactory, "location_type"),
        (f.DataLocationFactory, "storage_type"),
        (f.SourceFactory, "source_type"),
        (f.PipelineFactory, "trigger_type"),
        (f.DataProductFactory, "product_type"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_a_value_outside_the_choices_is_rejected_by_the_database(build, field):
    row = build()
    model = type(row)
    _rejected(lambda: model._default_manager.filter(pk=row.pk).update(**{field: "bogus"}))


def test_a_physical_copy_points_at_exactly_one_object():
    copy = f.PhysicalCopyFactory()
    raw_file = f.RawDataFileFactory()
    # Two objects set.
    _rejected(lambda: m.PhysicalCopy.objects.filter(pk=copy.pk).update(raw_data_file=raw_file))
    # The kind disagrees with the object.
    _rejected(lambda: m.PhysicalCopy.objects.filter(pk=copy.pk).update(kind="raw_data_file"))
    # No object at all.
    _rejected(
        lambda: m.PhysicalCopy.objects.create(
            kind="raw_data_package", location=copy.location, relative_path="x"
        )
    )


def test_only_one_live_copy_of_an_object_per_location_but_deleted_ones_are_history():
    copy = f.PhysicalCopyFactory()
    _rejected(
        lambda: f.PhysicalCopyFactory(
            raw_data_package=copy.raw_data_package, location=copy.location
        )
    )
    m.PhysicalCopy.objects.filter(pk=copy.pk).update(status="deleted")
    again = f.PhysicalCopyFactory(raw_data_package=copy.raw_data_package, location=copy.location)
    assert again.status == "present"


def test_two_active_runs_for_one_step_and_sub_group_are_rejected():
    run = f.ExecutedReductionStepFactory(sub_group_key="scan-1")
    _rejected(
        lambda: f.ExecutedReductionStepFactory(
            reduction_step=run.reduction_step, sub_group_key="scan-1"
        )
    )
    # Once the first is terminal a new run for the same sub-group is fine.
    m.ExecutedReductionStep.objects.filter(pk=run.pk).update(status="completed")
    f.ExecutedReductionStepFactory(reduction_step=run.reduction_step, sub_group_key="scan-1")


def test_nothing_is_unpacked_before_the_transfer_completed():
    transfer = f.DataTransferFactory(status=m.Status.IN_PROGRESS)
    _rejected(
        lambda: m.DataTransfer.objects.filter(pk=transfer.pk).update(unpack_status="scheduled")
    )


def test_an_archived_package_has_a_checksum():
    _rejected(lambda: f.RawDataPackageFactory(state=m.PackageState.ARCHIVED, checksum=""))


def test_sources_carry_what_their_kind_needs():
    _rejected(lambda: f.SourceFactory(ra_deg=None, dec_deg=None))
    _rejected(lambda: f.SourceFactory(ra_deg=400.0))
    _rejected(lambda: f.SourceFactory(source_type="solar_system", ephemeris_name=""))
    _rejected(lambda: f.SourceFactory(source_type="constant_elevation", elevation_deg=None))
    f.SourceFactory(source_type="solar_system", ephemeris_name="Jupiter", ra_deg=None, dec_deg=None)


def test_queue_name_parts_must_be_queue_safe():
    _rejected(lambda: f.SiteFactory(short_name="Cologne Site"))
    _rejected(lambda: f.DataLocationFactory(name="my-buffer"))


def test_locations_have_what_their_storage_needs():
    _rejected(lambda: f.DataLocationFactory(storage_type="disk", root_path=""))
    _rejected(lambda: f.DataLocationFactory(storage_type="s3", root_path="", s3_bucket=""))
    _rejected(lambda: f.DataLocationFactory(cleanup_percent=95, high_water_percent=90))
    _rejected(
        lambda: f.DataLocationFactory(name="dup", site=f.DataLocationFactory(name="dup").site)
    )


def test_a_scan_cannot_end_before_it_started():
    scan = f.ExecutedObsUnitFactory()
    _rejected(
        lambda: m.ExecutedObsUnit.objects.filter(pk=scan.pk).update(
            end_time=scan.start_time - timedelta(seconds=1)
        )
    )


def test_routes_and_transfers_connect_different_places():
    site = f.SiteFactory()
    _rejected(lambda: f.DataTransferRouteFactory(origin_site=site, destination_site=site))
    _rejected(lambda: f.DataTransferRouteFactory(route_type="relay"))
    _rejected(lambda: f.DataTransferRouteFactory(route_type="custom"))
    bundle = f.DataTransferPackageFactory()
    _rejected(
        lambda: f.DataTransferFactory(
            data_transfer_package=bundle, destination_location=bundle.origin_location
        )
    )


def test_sizes_are_never_negative():
    _rejected(lambda: f.RawDataFileFactory(size=-1))
    _rejected(lambda: f.RawDataPackageFactory(size=-1))
    _rejected(lambda: f.DataProductFactory(size_bytes=-5))


def test_one_live_archive_operation_and_one_live_deletion_per_target():
    lta = f.LongTermArchiveTransferFactory()
    _rejected(
        lambda: f.LongTermArchiveTransferFactory(
            raw_data_package=lta.raw_data_package, destination_location=lta.destination_location
        )
    )
    task = f.DeletionTaskFactory()
    _rejected(lambda: f.DeletionTaskFactory(physical_copy=task.physical_copy))


def test_state_events_are_append_only():
    event = f.EventFactory()
    event.reason = "rewritten history"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    with pytest.raises(AppendOnlyError):
        m.StateEvent.objects.filter(pk=event.pk).update(reason="x")
    with pytest.raises(AppendOnlyError):
        m.StateEvent.objects.all().delete()
    assert m.StateEvent.objects.get(pk=event.pk).reason == ""


def test_a_new_event_carrying_an_existing_id_cannot_overwrite_it():
    event = f.EventFactory(reason="what happened")
    forged = m.StateEvent(
        pk=event.pk, entity=event.entity, object_id=event.object_id, to_state="x", actor="forger"
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        forged.save()
    with pytest.raises(AppendOnlyError), transaction.atomic():
        m.StateEvent.objects.bulk_update([event], ["reason"])
    kept = m.StateEvent.objects.get(pk=event.pk)
    assert (kept.reason, kept.actor, kept.to_state) == (
        "what happened",
        event.actor,
        event.to_state,
    )
