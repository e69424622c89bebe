"""``manage.py why`` and the admin's "Why" line: one sentence per object on what it waits for or
what blocks it, its states and latest events; bad input is a clear error and changes nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from access import OPERATORS, ensure_groups
from pipelines import models as m
from pipelines.services.states import record_creation, transition
from pipelines.services.why import WhyError, explain, resolve, why_sentence
from tests import factories as f

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_client() -> Client:
    user = f.UserFactory(username="olga", is_staff=True)
    user.groups.add(ensure_groups()[OPERATORS])
    client = Client()
    client.force_login(user)
    return client


def _why(spec: str, *extra: str) -> str:
    out = StringIO()
    call_command("why", spec, *extra, stdout=out)
    return out.getvalue()


def test_a_pending_package_waits_for_the_packaging_manager():
    package = f.RawDataPackageFactory(status=m.Status.PENDING)

    text = _why(f"package:{package.pk}")

    assert f"raw data package {package.name}" in text
    assert "Why: the package tar is not built yet: waits for the packaging manager" in text


def test_a_package_is_found_by_name_too():
    package = f.RawDataPackageFactory()

    found, sub_group = resolve(f"package:{package.name}")

    assert found == package and sub_group is None


def test_a_retried_package_says_which_try_and_the_last_error():
    package = f.RawDataPackageFactory(
        status=m.Status.PENDING, retry_count=1, failure_error_message="disk full"
    )

    assert "try 2 of 4" in why_sentence(package)
    assert "disk full" in why_sentence(package)


def test_a_claim_whose_lease_expired_says_the_reconciler_will_hand_it_back():
    package = f.RawDataPackageFactory(
        status=m.Status.IN_PROGRESS,
        lease_owner="host:1:2",
        lease_expires_at=timezone.now() - timedelta(minutes=5),
    )

    sentence = why_sentence(package)

    assert "being worked on by host:1:2" in sentence
    assert "lease expired 5 min ago" in sentence


def test_a_failed_operation_says_so_with_its_message():
    archive = f.LongTermArchiveTransferFactory(
        status=m.Status.FAILED, retry_count=3, failure_error_message="bucket gone"
    )

    assert (
        _why(f"archive:{archive.pk}")
        .splitlines()[-1]
        .startswith("Why: failed for good after 3 retries: bucket gone")
    )


def test_an_archived_package_names_its_verified_archive_copies():
    package = f.RawDataPackageFactory(
        status=m.Status.COMPLETED, state=m.PackageState.ARCHIVED, archived_at=timezone.now()
    )
    lta = f.DataLocationFactory(location_type="long_term_archive", name="lta")
    f.PhysicalCopyFactory(raw_data_package=package, location=lta, integrity="verified")

    assert f"verified archive copies: {lta}" in why_sentence(package)


def test_an_unpackaged_file_waits_for_packaging_and_a_packaged_one_follows_its_package():
    loose = f.RawDataFileFactory(raw_data_package=None)
    package = f.RawDataPackageFactory(status=m.Status.COMPLETED, state=m.PackageState.WAITING)
    packed = f.RawDataFileFactory(raw_data_package=package)

    assert "not in a package yet" in why_sentence(loose)
    assert f"in package {package.name}" in _why(f"file:{packed.pk}")
    assert "waits for the bundling manager" in why_sentence(packed)


def test_a_damaged_copy_names_its_repair():
    copy = f.PhysicalCopyFactory(integrity=m.PhysicalCopy.Integrity.MISMATCH)
    repair = f.CopyRepairFactory(physical_copy=copy)

    sentence = why_sentence(copy)

    assert sentence.startswith(f"damaged (mismatch); repair {repair.pk} waits for the repair")


def test_a_deleted_copy_gives_its_reason():
    copy = f.PhysicalCopyFactory(
        status=m.PhysicalCopyStatus.DELETED,
        deleted_at=timezone.now(),
        deletion_reason="buffer copy: archived twice",
    )

    assert "deleted" in why_sentence(copy) and "archived twice" in why_sentence(copy)


def test_a_transfer_that_arrived_waits_for_unpacking():
    transfer = f.DataTransferFactory(status=m.Status.COMPLETED, unpack_status=m.Status.PENDING)

    assert "arrived; unpacking waits for the unpack manager" in why_sentence(transfer)


def test_a_run_awaiting_retry_and_a_run_failed_for_good_read_differently():
    retrying = f.ExecutedReductionStepFactory(
        status="failed", retry_count=0, max_retries=2, failure_reason="exit code 3"
    )
    done = f.ExecutedReductionStepFactory(
        status="failed", failed_for_good=True, retry_count=2, max_retries=2, failure_reason="oom"
    )

    assert "will be retried (attempt 2 of 3)" in why_sentence(retrying)
    assert why_sentence(done).startswith("failed for good after 3 attempts: oom")


def test_the_latest_events_come_newest_first_and_json_output_parses():
    package = f.RawDataPackageFactory(status=m.Status.PENDING)
    record_creation(package, actor="test", reason="made")
    transition(package, m.Status.SCHEDULED, actor="manager", reason="claimed")

    payload = json.loads(_why(f"package:{package.pk}", "--json"))

    assert payload["events"][0]["to"] == "scheduled"
    assert payload["states"]["status"] == "scheduled"
    assert len(explain(package).events) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("package", "expected <kind>:<id or name>"),
        ("widget:4", "unknown kind 'widget'"),
        ("copy:abc", "copy ids are numbers"),
        ("run:999999", "no run '999999'"),
        ("step:nopipeline", "a step is named <pipeline>/<step>"),
        ("step:none/none", "no step 'none' in a pipeline named 'none'"),
        ("file:does/not/exist.dat", "no file 'does/not/exist.dat'"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(spec, message):
    f.RawDataPackageFactory()
    events = m.StateEvent.objects.count()

    with pytest.raises(CommandError, match=message):
        _why(spec)

    assert m.StateEvent.objects.count() == events


def test_resolve_refuses_unknown_kinds_with_the_known_ones_listed():
    with pytest.raises(WhyError, match="known: package, file, copy"):
        resolve("thing:1")


def test_the_admin_change_page_shows_the_same_sentence(operator_client):
    package = f.RawDataPackageFactory(status=m.Status.PENDING)

    response = operator_client.get(
        reverse("admin:pipelines_rawdatapackage_change", args=[package.pk])
    )

    assert response.status_code == 200
    assert why_sentence(package) in response.content.decode()
