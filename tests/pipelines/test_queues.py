"""Queue names stay unambiguous: a Site or DataLocation whose queues another location already
owns is refused when it is saved, and discovery refuses to list queues while a clash exists.

Names keep the SPEC's ``{site}_{location}_{operation}`` shape; see ``pipelines.queues``.
"""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from pipelines import queues
from pipelines.models import DataLocation, Site
from tests import factories as f

LT = DataLocation.LocationType

pytestmark = pytest.mark.django_db


@pytest.fixture
def uni() -> Any:
    """Site ``uni`` with a buffer ``koeln_buffer``: it owns ``uni_koeln_buffer_deletion``."""
    site = f.SiteFactory(short_name="uni", name="University")
    f.DataLocationFactory(site=site, name="koeln_buffer", location_type=LT.BUFFER)
    return site


def _unsaved_buffer(site: Site, name: str) -> DataLocation:
    return DataLocation(site=site, name=name, location_type=LT.BUFFER, root_path="/tmp/x")


def test_it_keeps_the_site_location_operation_shape_for_normal_names() -> None:
    cologne = f.SiteFactory(short_name="cologne")
    buffer = f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    assert queues.queue_name(buffer, "deletion") == "cologne_buffer_deletion"
    assert "cologne_buffer_deletion" in queues.discover_queues()


def test_it_refuses_to_save_a_location_whose_queues_another_site_owns(uni: Any) -> None:
    uni_koeln = f.SiteFactory(short_name="uni_koeln")
    clash = _unsaved_buffer(uni_koeln, "buffer")

    with pytest.raises(ValidationError) as excinfo:
        clash.save()

    message = str(excinfo.value)
    assert "uni_koeln_buffer_deletion" in message
    assert "location uni:koeln_buffer" in message
    assert not DataLocation.objects.filter(site=uni_koeln).exists()


def test_it_reports_the_clash_on_the_name_field_from_full_clean(uni: Any) -> None:
    clash = _unsaved_buffer(f.SiteFactory(short_name="uni_koeln"), "buffer")

    with pytest.raises(ValidationError) as excinfo:
        clash.full_clean()

    assert "uni_koeln_buffer_data_transfer" in " ".join(excinfo.value.message_dict["name"])


def test_it_refuses_to_rename_a_site_into_another_sites_queues(uni: Any) -> None:
    cologne = f.SiteFactory(short_name="cologne")
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    cologne.short_name = "uni_koeln"

    with pytest.raises(ValidationError) as excinfo:
        cologne.full_clean()
    assert "uni:koeln_buffer" in " ".join(excinfo.value.message_dict["short_name"])
    with pytest.raises(ValidationError, match="uni_koeln_buffer_deletion"):
        cologne.save()

    assert Site.objects.get(pk=cologne.pk).short_name == "cologne"


def test_it_refuses_a_location_of_the_shorter_site_that_meets_the_longer_one() -> None:
    # The same clash, created in the other order.
    uni_koeln = f.SiteFactory(short_name="uni_koeln")
    f.DataLocationFactory(site=uni_koeln, name="buffer", location_type=LT.BUFFER)
    uni = f.SiteFactory(short_name="uni")

    with pytest.raises(ValidationError, match="location uni_koeln:buffer"):
        _unsaved_buffer(uni, "koeln_buffer").save()


def test_it_counts_inactive_locations_as_owners(uni: Any) -> None:
    DataLocation.objects.filter(site=uni).update(active=False)
    with pytest.raises(ValidationError, match="uni:koeln_buffer"):
        _unsaved_buffer(f.SiteFactory(short_name="uni_koeln"), "buffer").save()


def test_it_refuses_a_clash_through_an_operation_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # No current operation name ends in another one, but nothing stops one being added:
    # with an operation "transfer", buffer + data_transfer and buffer_data + transfer meet.
    monkeypatch.setitem(
        queues.VALID_OPERATIONS, LT.BUFFER, (*queues.VALID_OPERATIONS[LT.BUFFER], "transfer")
    )
    cologne = f.SiteFactory(short_name="cologne")
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)

    with pytest.raises(ValidationError) as excinfo:
        _unsaved_buffer(cologne, "buffer_data").full_clean()

    assert "cologne_buffer_data_transfer" in " ".join(excinfo.value.message_dict["name"])
    assert "location cologne:buffer" in " ".join(excinfo.value.message_dict["name"])


def test_it_lets_a_location_and_its_site_be_saved_again_unchanged(uni: Any) -> None:
    location = DataLocation.objects.get(site=uni)
    location.priority = 5
    location.full_clean()
    location.save()
    uni.name = "University of Somewhere"
    uni.full_clean()
    uni.save()
    assert DataLocation.objects.get(pk=location.pk).priority == 5


def test_it_skips_the_check_when_a_save_changes_no_part_of_a_queue_name(
    uni: Any, django_assert_num_queries: Any
) -> None:
    location = DataLocation.objects.get(site=uni)
    location.priority = 7
    with django_assert_num_queries(1):  # the UPDATE alone
        location.save(update_fields=["priority"])
    uni.location = "Somewhere"
    with django_assert_num_queries(1):
        uni.save(update_fields=["location"])


def test_it_leaves_exact_duplicates_to_the_unique_constraints(uni: Any) -> None:
    # Same site and name, or same short name, is a duplicate row, not two spellings of one
    # queue: validate_unique reports it (and the database refuses it), not the queue check.
    with pytest.raises(ValidationError) as excinfo:
        _unsaved_buffer(uni, "koeln_buffer").full_clean()
    assert "already has a location with this name" in str(excinfo.value)
    assert "queue" not in str(excinfo.value)
    with pytest.raises(ValidationError) as excinfo:
        Site(name="Another", short_name="uni").full_clean()
    assert "queue" not in str(excinfo.value)


def test_discovery_names_both_locations_when_a_clash_got_in_anyway(uni: Any) -> None:
    # QuerySet.update skips save(); so would raw SQL or two concurrent saves.
    other = f.SiteFactory(short_name="other")
    location = f.DataLocationFactory(site=other, name="buffer", location_type=LT.BUFFER)
    Site.objects.filter(pk=other.pk).update(short_name="uni_koeln")
    f.DataLocationFactory(
        site=f.SiteFactory(short_name="chile"), name="source", location_type=LT.SOURCE
    )

    for selection in ({}, {"site": "uni"}, {"site": "uni_koeln"}, {"location_ids": [location.pk]}):
        with pytest.raises(queues.QueueNameClash) as excinfo:
            queues.discover_queues(**selection)
        message = str(excinfo.value)
        assert "'uni_koeln_buffer_deletion' belongs to" in message
        assert "uni:koeln_buffer (id " in message
        assert f"uni_koeln:buffer (id {location.pk})" in message

    # The command a worker's start-up script runs says so plainly, without a traceback.
    with pytest.raises(CommandError, match="ambiguous queue names"):
        call_command("queues", "--site", "uni", stdout=StringIO())

    # A worker none of whose queues is ambiguous still gets its list.
    assert queues.discover_queues(site="chile") == [
        "chile_source_deletion",
        "chile_source_integrity_check",
        "chile_source_raw_data_package_creation",
    ]


def test_the_demo_facility_loads_and_its_queues_are_discovered() -> None:
    # Through the command, which stays put while the loader module moves.
    call_command("load_demo_facility", stdout=StringIO())
    names = queues.discover_queues()
    assert "cologne_buffer_deletion" in names
    assert "ccat_chai_raw_data_raw_data_package_creation" in names
    assert "us_lta_long_term_archive_transfer" in names
    assert len(names) == len(set(names))
