"""Integrity re-verification: reading copies back, recording good and damaged results with their
events, the manager's claim on due copies, marking damage under the package lock, and /health."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from pipelines.models import CopyRepair, PhysicalCopy, PhysicalCopyStatus, StateEvent, Status
from pipelines.services import integrity
from pipelines.services.copies import copy_lock_object
from pipelines.services.integrity import (
    copies_claim_for_verification,
    copies_due_for_verification,
    copy_mark_damaged,
    copy_verification_run,
    copy_verify,
    integrity_manager_tick,
)
from pipelines.storage.checksums import checksum_bytes
from pipelines.storage.posix import PosixStorage
from tests import factories as f

I = PhysicalCopy.Integrity  # noqa: E741 - reads like the model's own alias
DATA = b"the only copy of a night on the mountain\n" * 100


def package_copy(tmp_path: Path, *, data: bytes = DATA, name: str = "a", **kwargs: Any) -> Any:
    """A package copy whose file is really at its location (``tmp_path/<name>``)."""
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    location = kwargs.pop("location", None) or f.DataLocationFactory(root_path=str(root))
    package = kwargs.pop("package", None) or f.RawDataPackageFactory(
        checksum=checksum_bytes(DATA, "sha256")
    )
    copy = f.PhysicalCopyFactory(raw_data_package=package, location=location, **kwargs)
    target = Path(location.root_path) / copy.relative_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return copy


def events(copy: PhysicalCopy) -> list[tuple[str, str]]:
    return list(
        StateEvent.objects.filter(entity="physical_copy", object_id=str(copy.pk), field="integrity")
        .order_by("pk")
        .values_list("from_state", "to_state")
    )


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, str]]:
    """Verification tasks enqueued: (copy id, claimed_until, queue)."""
    calls: list[tuple[int, str, str]] = []

    def record(task: Any, pk: int, until: Any, queue: str) -> None:
        calls.append((pk, until.isoformat(), queue))

    monkeypatch.setattr(integrity, "_enqueue_verification", record)
    return calls


# --- reading back --------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_good_unverified_copy_becomes_verified_with_an_event(tmp_path: Path) -> None:
    copy = package_copy(tmp_path)
    assert copy_verify(copy, actor="test") == "verified"
    copy.refresh_from_db()
    assert copy.integrity == I.VERIFIED
    assert copy.verified_checksum == checksum_bytes(DATA)
    assert copy.checksum_verified_at is not None
    assert events(copy) == [("unverified", "verified")]


@pytest.mark.django_db
def test_a_good_reverification_refreshes_the_time_without_an_event(tmp_path: Path) -> None:
    long_ago = timezone.now() - timedelta(days=90)
    copy = package_copy(tmp_path, integrity=I.VERIFIED, checksum_verified_at=long_ago)
    assert copy_verify(copy, actor="test") == "verified"
    copy.refresh_from_db()
    assert copy.integrity == I.VERIFIED
    assert copy.checksum_verified_at > long_ago
    assert events(copy) == []


@pytest.mark.django_db
def test_a_flipped_byte_marks_the_copy_mismatch_with_an_event_and_a_repair(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = bytearray(DATA)
    bad[100] ^= 0x01
    copy = package_copy(tmp_path, data=bytes(bad), integrity=I.VERIFIED)
    with caplog.at_level("WARNING", logger="pipelines.alerts"):
        assert copy_verify(copy, actor="test") == "mismatch"
    copy.refresh_from_db()
    assert copy.integrity == I.MISMATCH
    assert events(copy) == [("verified", "mismatch")]
    reason = StateEvent.objects.get(entity="physical_copy", object_id=str(copy.pk)).reason
    assert "checksum mismatch" in reason and copy.relative_path in reason
    [repair] = CopyRepair.objects.filter(physical_copy=copy)
    assert repair.status == Status.PENDING
    assert "mismatch" in caplog.text


@pytest.mark.django_db
def test_a_file_gone_from_a_reachable_location_marks_the_copy_missing(tmp_path: Path) -> None:
    copy = package_copy(tmp_path, integrity=I.VERIFIED)
    (Path(copy.location.root_path) / copy.relative_path).unlink()
    assert copy_verify(copy, actor="test") == "missing"
    copy.refresh_from_db()
    assert copy.integrity == I.MISSING
    assert events(copy) == [("verified", "missing")]
    assert CopyRepair.objects.filter(physical_copy=copy, status=Status.PENDING).count() == 1


@pytest.mark.django_db
def test_an_unreachable_location_is_skipped_never_read_as_missing(tmp_path: Path) -> None:
    copy = package_copy(tmp_path, integrity=I.VERIFIED)
    type(copy.location).objects.filter(pk=copy.location_id).update(
        root_path=str(tmp_path / "not-mounted")
    )
    copy.location.refresh_from_db()
    assert copy_verify(copy, actor="test") == "skipped"
    copy.refresh_from_db()
    assert copy.integrity == I.VERIFIED
    assert not CopyRepair.objects.exists()


@pytest.mark.django_db
def test_the_objects_algorithm_is_used_not_the_locations(tmp_path: Path) -> None:
    package = f.RawDataPackageFactory(
        checksum=checksum_bytes(DATA, "xxh3_128"), checksum_algorithm="xxh3_128"
    )
    location = f.DataLocationFactory(root_path=str(tmp_path / "a"), checksum_algorithm="sha256")
    copy = package_copy(tmp_path, package=package, location=location)
    assert copy_verify(copy, actor="test") == "verified"


@pytest.mark.django_db
def test_a_copy_being_deleted_is_not_read(tmp_path: Path) -> None:
    copy = package_copy(tmp_path, status=PhysicalCopyStatus.DELETION_IN_PROGRESS)
    (Path(copy.location.root_path) / copy.relative_path).unlink()
    assert copy_verify(copy, actor="test") == "skipped"
    copy.refresh_from_db()
    assert copy.integrity == I.UNVERIFIED


@pytest.mark.django_db
def test_a_result_read_before_a_repair_landed_is_not_recorded_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = package_copy(tmp_path, data=b"stale bytes", integrity=I.MISMATCH)
    original = PosixStorage.checksum

    def read_then_repair(self: PosixStorage, path: str, algorithm: str) -> tuple[str, int]:
        answer = original(self, path, algorithm)
        # The repair finishes while the (stale) bytes were being hashed.
        PhysicalCopy.objects.filter(pk=copy.pk).update(
            integrity=I.VERIFIED, checksum_verified_at=timezone.now()
        )
        return answer

    monkeypatch.setattr(PosixStorage, "checksum", read_then_repair)
    assert copy_verify(copy, actor="test") == "skipped"
    copy.refresh_from_db()
    assert copy.integrity == I.VERIFIED
    assert not CopyRepair.objects.exists()


# --- copy_mark_damaged ---------------------------------------------------------------------------
@pytest.mark.django_db
def test_marking_damaged_twice_moves_once_and_schedules_one_repair(tmp_path: Path) -> None:
    copy = package_copy(tmp_path, integrity=I.VERIFIED)
    assert copy_mark_damaged(copy, I.MISSING, actor="audit", reason="lost") is True
    assert copy_mark_damaged(copy, I.MISSING, actor="audit", reason="lost again") is False
    assert copy.integrity == I.MISSING
    assert CopyRepair.objects.filter(physical_copy=copy).count() == 1
    assert events(copy) == [("verified", "missing")]


@pytest.mark.django_db
def test_a_copy_that_is_not_present_is_marked_but_gets_no_repair(tmp_path: Path) -> None:
    copy = package_copy(tmp_path, status=PhysicalCopyStatus.DELETION_SCHEDULED)
    assert copy_mark_damaged(copy, I.MISMATCH, actor="test", reason="bad") is True
    assert not CopyRepair.objects.exists()
    deleted = package_copy(tmp_path, name="b", status=PhysicalCopyStatus.DELETED)
    assert copy_mark_damaged(deleted, I.MISSING, actor="test", reason="gone") is False


@pytest.mark.django_db
def test_a_damaged_copy_whose_repair_failed_gets_no_new_repair_until_reset(tmp_path: Path) -> None:
    copy = package_copy(tmp_path, integrity=I.MISMATCH)
    f.CopyRepairFactory(physical_copy=copy, status=Status.FAILED)
    assert copy_mark_damaged(copy, I.MISMATCH, actor="test", reason="still bad") is False
    assert CopyRepair.objects.filter(physical_copy=copy).count() == 1


@pytest.mark.django_db
def test_marking_refuses_an_integrity_that_is_not_damage(tmp_path: Path) -> None:
    copy = package_copy(tmp_path)
    with pytest.raises(ValueError, match="not a damaged integrity"):
        copy_mark_damaged(copy, I.VERIFIED, actor="test", reason="?")


@pytest.mark.django_db(transaction=True)
def test_a_mark_waits_for_the_package_lock_held_by_a_deletion_style_move(
    require_postgres: None, tmp_path: Path
) -> None:
    """A deletion start holds the package row (copy_lock_object) while it re-checks its rule; a
    mark of the sibling copy must wait for it, then see its result."""
    good = package_copy(tmp_path, integrity=I.VERIFIED)
    other = package_copy(tmp_path, name="b", package=good.raw_data_package, integrity=I.VERIFIED)
    holding = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def deletion() -> None:
        try:
            with transaction.atomic():
                copy_lock_object(other)
                holding.set()
                release.wait(10)
                PhysicalCopy.objects.filter(pk=other.pk).update(
                    status=PhysicalCopyStatus.DELETION_SCHEDULED
                )
                order.append("deletion")
        finally:
            connection.close()

    def mark() -> None:
        try:
            holding.wait(10)
            copy_mark_damaged(good, I.MISMATCH, actor="test", reason="bad")
            order.append("mark")
        finally:
            connection.close()

    threads = [threading.Thread(target=deletion), threading.Thread(target=mark)]
    for thread in threads:
        thread.start()
    holding.wait(10)
    threading.Event().wait(0.5)  # the mark is now blocked on the package row
    assert order == []
    release.set()
    for thread in threads:
        thread.join(20)
    assert order == ["deletion", "mark"]
    good.refresh_from_db()
    assert good.integrity == I.MISMATCH


@pytest.mark.django_db(transaction=True)
def test_two_marks_of_one_copy_at_once_move_it_once_and_schedule_one_repair(
    require_postgres: None, tmp_path: Path
) -> None:
    copy = package_copy(tmp_path, integrity=I.VERIFIED)
    barrier = threading.Barrier(2)
    results: list[bool] = []

    def mark(integrity: str) -> None:
        try:
            barrier.wait(10)
            mine = PhysicalCopy.objects.get(pk=copy.pk)
            results.append(copy_mark_damaged(mine, integrity, actor="t", reason=integrity))
        finally:
            connection.close()

    threads = [threading.Thread(target=mark, args=(I.MISSING,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == [False, True]
    assert CopyRepair.objects.filter(physical_copy=copy).count() == 1
    assert events(copy) == [("verified", "missing")]


# --- the manager's claim -------------------------------------------------------------------------
@pytest.mark.django_db
def test_due_copies_are_unverified_or_past_their_locations_interval(tmp_path: Path) -> None:
    now = timezone.now()
    never = package_copy(tmp_path, name="a")
    old = package_copy(
        tmp_path, name="b", integrity=I.VERIFIED, checksum_verified_at=now - timedelta(days=31)
    )
    package_copy(
        tmp_path, name="c", integrity=I.VERIFIED, checksum_verified_at=now - timedelta(days=1)
    )
    package_copy(tmp_path, name="d", integrity=I.MISMATCH)
    package_copy(tmp_path, name="e", status=PhysicalCopyStatus.DELETION_SCHEDULED)
    package_copy(tmp_path, name="g", verification_claimed_until=now + timedelta(minutes=5))
    no_checksum = f.RawDataPackageFactory(checksum="")
    package_copy(tmp_path, name="h", package=no_checksum)
    short = f.DataLocationFactory(
        root_path=str(tmp_path / "i"), verification_interval=timedelta(hours=1)
    )
    hourly = package_copy(
        tmp_path,
        name="i",
        location=short,
        integrity=I.VERIFIED,
        checksum_verified_at=now - timedelta(hours=2),
    )
    inactive = f.DataLocationFactory(root_path=str(tmp_path / "j"), active=False)
    package_copy(tmp_path, name="j", location=inactive)
    tape = f.DataLocationFactory(root_path=str(tmp_path / "k"), storage_type="tape")
    package_copy(tmp_path, name="k", location=tape)
    assert list(copies_due_for_verification(now)) == [never, old, hourly]


@pytest.mark.django_db(transaction=True)
def test_the_tick_claims_and_dispatches_each_due_copy_once(
    tmp_path: Path, sent: list[tuple[int, str, str]]
) -> None:
    site = f.SiteFactory(short_name="cologne")
    location = f.DataLocationFactory(
        site=site, name="lta", location_type="long_term_archive", root_path=str(tmp_path / "a")
    )
    copy = package_copy(tmp_path, location=location)
    assert integrity_manager_tick(owner="m1") == {"claimed": 1}
    assert integrity_manager_tick(owner="m2") == {"claimed": 0}
    [(pk, until, queue)] = sent
    assert (pk, queue) == (copy.pk, "cologne_lta_integrity_check")
    copy.refresh_from_db()
    assert copy.verification_claimed_until.isoformat() == until


@pytest.mark.django_db
def test_an_expired_claim_makes_the_copy_due_again(tmp_path: Path) -> None:
    copy = package_copy(tmp_path)
    _until, ids = copies_claim_for_verification(copies_due_for_verification(), limit=10)
    assert ids == [copy.pk]
    assert list(copies_due_for_verification()) == []
    later = timezone.now() + timedelta(seconds=3600)
    assert list(copies_due_for_verification(later)) == [copy]


@pytest.mark.django_db
def test_the_worker_verifies_and_releases_only_its_own_claim(tmp_path: Path) -> None:
    copy = package_copy(tmp_path)
    until, _ids = copies_claim_for_verification(copies_due_for_verification(), limit=10)
    result = copy_verification_run(copy.pk, claimed_until=until.isoformat(), actor="w")
    assert result.outcome == "verified"
    copy.refresh_from_db()
    assert copy.verification_claimed_until is None
    # A late report from an older claim leaves a newer claim alone.
    newer = timezone.now() + timedelta(minutes=10)
    PhysicalCopy.objects.filter(pk=copy.pk).update(verification_claimed_until=newer)
    copy_verification_run(copy.pk, claimed_until=until.isoformat(), actor="w")
    copy.refresh_from_db()
    assert copy.verification_claimed_until == newer


@pytest.mark.django_db
def test_an_unreadable_copy_keeps_its_claim_until_it_expires(tmp_path: Path) -> None:
    copy = package_copy(tmp_path)
    type(copy.location).objects.filter(pk=copy.location_id).update(root_path=str(tmp_path / "gone"))
    until, _ids = copies_claim_for_verification(copies_due_for_verification(), limit=10)
    result = copy_verification_run(copy.pk, claimed_until=until.isoformat(), actor="w")
    assert (result.outcome, result.retry_later) == ("skipped", True)
    copy.refresh_from_db()
    assert copy.verification_claimed_until is not None


@pytest.mark.django_db(transaction=True)
def test_the_tasks_tick_the_manager_and_verify_a_claimed_copy(
    tmp_path: Path, sent: list[tuple[int, str, str]]
) -> None:
    from pipelines.tasks import run_integrity_manager, verify_physical_copy

    copy = package_copy(tmp_path)
    assert run_integrity_manager() == {"claimed": 1}
    [(pk, until, _queue)] = sent
    answer = verify_physical_copy(pk, claimed_until=until)
    assert (answer["id"], answer["outcome"]) == (copy.pk, "verified")
    copy.refresh_from_db()
    assert (copy.integrity, copy.verification_claimed_until) == (I.VERIFIED, None)
    assert verify_physical_copy(10**9)["outcome"] == "skipped"


# --- /health -------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_health_counts_damaged_copies_and_failed_repairs_and_stays_200(
    client: Any, tmp_path: Path
) -> None:
    package_copy(tmp_path, name="a", integrity=I.MISMATCH)
    package_copy(tmp_path, name="b", integrity=I.MISSING)
    package_copy(tmp_path, name="c", integrity=I.MISSING, status=PhysicalCopyStatus.DELETED)
    f.CopyRepairFactory(status=Status.FAILED)
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    # The failed repair's own copy (a factory MISMATCH copy) counts too.
    assert body["integrity"] == {
        "mismatch": 2,
        "missing": 1,
        "repairs_pending": 0,
        "repairs_failed": 1,
    }
    assert body["failed"]["copy_repair"] == 1


# --- admin ---------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_an_operator_verifies_copies_now_from_the_admin(
    tmp_path: Path, sent: list[tuple[int, str, str]]
) -> None:
    from django.contrib.messages import get_messages
    from django.test import Client
    from django.urls import reverse

    from access import OPERATORS, VIEWERS, ensure_groups

    groups = ensure_groups()
    verified = package_copy(
        tmp_path, name="a", integrity=I.VERIFIED, checksum_verified_at=timezone.now()
    )
    deleting = package_copy(tmp_path, name="b", status=PhysicalCopyStatus.DELETION_IN_PROGRESS)
    url = reverse("admin:pipelines_physicalcopy_changelist")
    form = {"action": "verify_now", "_selected_action": [verified.pk, deleting.pk], "index": 0}

    viewer = f.UserFactory(username="victor", is_staff=True)
    viewer.groups.add(groups[VIEWERS])
    client = Client()
    client.force_login(viewer)
    refused = client.post(url, form)
    assert sent == []
    assert "No action selected." in [str(m) for m in get_messages(refused.wsgi_request)]
    client = Client()

    operator = f.UserFactory(username="olga", is_staff=True)
    operator.groups.add(groups[OPERATORS])
    client.force_login(operator)
    response = client.post(url, form)
    # Due or not, the selected live copy is dispatched; the one being deleted is not.
    assert [pk for pk, _until, _queue in sent] == [verified.pk]
    [message] = [str(m) for m in get_messages(response.wsgi_request)]
    assert "Dispatched 1 verification(s)" in message and "1 skipped" in message
