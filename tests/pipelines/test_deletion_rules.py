"""The deletion rules one by one: each keeps a copy for its reason, and lets it go once the
reason is gone (``pipelines.services.deletion.rules``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from pipelines.models import (
    DataLocation,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataPackage,
    Status,
)
from pipelines.services.deletion import (
    deletion_manager_tick,
    deletion_verdict,
)
from tests import factories as f
from tests.pipelines.test_deletion import (
    drain,
    file_copy,
    make_world,
    package_copy,
)

CS = PhysicalCopyStatus
LT = DataLocation.LocationType


# --- the rules one by one ------------------------------------------------------------------------
@pytest.mark.django_db
def test_long_term_archive_copies_are_never_deleted_by_policy(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    package_copy(
        world.package,
        f.DataLocationFactory(site=world.lta.site, location_type=LT.LONG_TERM_ARCHIVE),
    )
    verdict = deletion_verdict(world.lta_copy)
    assert verdict.rule == "long_term_archive"
    drain(now=timezone.now() + timedelta(days=3650))
    assert (
        PhysicalCopy.objects.filter(location__location_type=LT.LONG_TERM_ARCHIVE)
        .exclude(status=CS.PRESENT)
        .count()
        == 0
    )


@pytest.mark.django_db
def test_a_copy_is_kept_until_the_retention_period_from_archiving_has_passed(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, archived_days_ago=2)
    verdict = deletion_verdict(world.buffer_copy)
    assert verdict.rule == "retention"
    assert "retention of 7 days at obs:buffer runs until" in verdict.reason
    assert deletion_manager_tick(owner="test")["scheduled"] == 0
    DataLocation.objects.filter(pk=world.obs_buffer.pk).update(retention_period=timedelta(0))
    assert deletion_verdict(world.buffer_copy).deletable
    assert deletion_manager_tick(owner="test")["scheduled"] == 1


@pytest.mark.django_db
def test_a_safety_critical_site_needs_two_verified_archive_copies(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    world.obs_buffer.site.min_archive_copies = 2
    world.obs_buffer.site.save()
    verdict = deletion_verdict(world.buffer_copy)
    assert verdict.rule == "archive_copies"
    assert verdict.reason.startswith("only 1 of 2 required verified archive copies")
    # The package came from that site: its copies elsewhere need two as well.
    other = package_copy(world.package, world.arc_buffer)
    assert deletion_verdict(other).rule == "archive_copies"
    second = f.DataLocationFactory(
        site=world.arc_buffer.site, name="tape", location_type=LT.LONG_TERM_ARCHIVE
    )
    package_copy(world.package, second)
    assert deletion_verdict(world.buffer_copy).deletable


@pytest.mark.django_db
def test_a_run_holding_the_package_as_input_keeps_its_copies(tmp_path: Path) -> None:
    from pipelines.models import RunStatus

    world = make_world(tmp_path)
    run = f.ExecutedReductionStepFactory(status=RunStatus.RUNNING)
    run.input_raw_packages.set([world.package])
    assert deletion_verdict(world.buffer_copy).rule == "in_use"
    assert f"run {run.pk}" in deletion_verdict(world.buffer_copy).reason
    # A failed run with retries left is not terminal; one without retries is.
    run.status, run.retry_count = RunStatus.FAILED, 0
    run.save()
    assert deletion_verdict(world.buffer_copy).rule == "in_use"
    run.retry_count = run.max_retries
    run.save()
    assert deletion_verdict(world.buffer_copy).deletable


@pytest.mark.django_db
def test_live_operations_on_the_package_keep_the_copies_they_read_or_write(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    archive = f.LongTermArchiveTransferFactory(
        raw_data_package=world.package,
        origin_location=world.obs_buffer,
        destination_location=world.lta,
    )
    assert "archive transfer" in deletion_verdict(world.buffer_copy).reason
    archive.status = Status.COMPLETED
    archive.save()
    repair = f.CopyRepairFactory(physical_copy=world.lta_copy)
    assert deletion_verdict(world.buffer_copy).reason == (
        f"copy repair {repair.pk} of package {world.package.name} is live"
    )
    assert deletion_verdict(world.source_copies[0]).rule == "in_use"
    repair.status = Status.FAILED
    repair.save()
    assert deletion_verdict(world.buffer_copy).deletable


@pytest.mark.django_db
def test_a_buffer_copy_stays_until_every_active_archive_of_its_site_holds_the_package(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path)
    arrived = package_copy(world.package, world.arc_buffer)
    tape = f.DataLocationFactory(
        site=world.lta.site, name="tape", location_type=LT.LONG_TERM_ARCHIVE
    )
    verdict = deletion_verdict(arrived)
    assert verdict.rule == "in_use"
    assert "still to be archived in arc:tape" in verdict.reason
    package_copy(world.package, tape)
    assert deletion_verdict(arrived).deletable


@pytest.mark.django_db
def test_a_bundle_tar_goes_once_every_transfer_arrived_and_was_unpacked(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    bundle = f.DataTransferPackageFactory(origin_location=world.obs_buffer, status=Status.COMPLETED)
    RawDataPackage.objects.filter(pk=world.package.pk).update(data_transfer_package=bundle)
    tar = f.PhysicalCopyFactory(
        kind=PhysicalCopy.Kind.DATA_TRANSFER_PACKAGE,
        raw_data_package=None,
        data_transfer_package=bundle,
        location=world.obs_buffer,
        relative_path=bundle.relative_path,
    )
    world.write(tar)
    assert "has not left its observatory" in deletion_verdict(tar).reason
    transfer = f.DataTransferFactory(
        data_transfer_package=bundle,
        destination_location=world.arc_buffer,
        is_primary=True,
        status=Status.COMPLETED,
    )
    assert deletion_verdict(tar).reason == (
        f"bundle transfer {transfer.pk} to arc:buffer has not been unpacked yet"
    )
    # The package copy at the origin is in use by the same transfer.
    assert deletion_verdict(world.buffer_copy).rule == "in_use"
    transfer.unpack_status = Status.COMPLETED
    transfer.save()
    verdict = deletion_verdict(tar)
    assert verdict.deletable, verdict
    assert verdict.reason.startswith("bundle tar, every transfer unpacked")
    drain()
    tar.refresh_from_db()
    assert tar.status == CS.DELETED


@pytest.mark.django_db
def test_unpackaged_files_and_data_products_are_kept(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    loose = f.RawDataFileFactory(source_location=world.source)
    copy = file_copy(loose, world.source)
    assert deletion_verdict(copy).reason == "the file is not in a package yet"
    product = f.DataProductFactory()
    product_copy = f.PhysicalCopyFactory(
        kind=PhysicalCopy.Kind.DATA_PRODUCT,
        raw_data_package=None,
        data_product=product,
        location=world.processing,
        relative_path="products/p.fits",
    )
    assert deletion_verdict(product_copy).rule == "data_product"
