"""Repairs of damaged copies: from a verified good copy only (never a damaged or unverified one),
written to a temporary name, checked, renamed over the damaged path; a clear failure without a
good source; safe to run again after a killed worker. Also the Storage.rename the repair uses."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from pipelines.exceptions import NonRetryableError
from pipelines.models import CopyRepair, PhysicalCopy, StateEvent, Status
from pipelines.services import integrity
from pipelines.services.integrity import (
    NoGoodSource,
    copy_mark_damaged,
    copy_repair_run,
    repair_manager_tick,
    repair_temp_path,
)
from pipelines.services.operations import operation_claim_batch
from pipelines.services.recovery import recover_expired_leases
from pipelines.storage.base import ObjectNotFound
from pipelines.tasks import repair_physical_copy
from tests import factories as f
from tests.pipelines.test_storage_contract import (
    TEST_KEY_ID,
    TEST_SECRET,
    Backend,
    backend,
    moto_endpoint,
    new_bucket,
    raw_s3_client,
    s3_storage_factory,
)

__all__ = ["backend", "moto_endpoint", "s3_storage_factory"]  # fixtures, used by name

I = PhysicalCopy.Integrity  # noqa: E741
DATA = bytes(range(256)) * 64
BAD = DATA[:1000] + bytes([DATA[1000] ^ 0x01]) + DATA[1001:]


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class Object:
    """One package with copies at several disk locations, each holding the given bytes."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.package = f.RawDataPackageFactory(checksum=sha(DATA))
        self.site = f.SiteFactory(short_name="cologne")

    def copy(self, name: str, data: bytes | None, *, site: Any = None, **kwargs: Any) -> Any:
        root = self.tmp / name
        root.mkdir()
        location = f.DataLocationFactory(
            site=site or self.site, name=name, root_path=str(root), location_type="buffer"
        )
        if kwargs.get("integrity") == I.VERIFIED:
            # What a verification records: the registered checksum, read back.
            kwargs.setdefault("verified_checksum", sha(DATA))
        copy = f.PhysicalCopyFactory(raw_data_package=self.package, location=location, **kwargs)
        if data is not None:
            path = root / copy.relative_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return copy


def file_of(copy: PhysicalCopy) -> Path:
    return Path(copy.location.root_path) / copy.relative_path


def claim(repair: CopyRepair) -> str:
    token = operation_claim_batch(
        CopyRepair, owner="test", limit=10, queryset=CopyRepair.objects.filter(pk=repair.pk)
    ).token
    return token


def damaged(obj: Object, name: str = "bad", data: bytes | None = BAD, **kwargs: Any) -> Any:
    copy = obj.copy(name, data, integrity=I.VERIFIED, **kwargs)
    assert copy_mark_damaged(
        copy, I.MISMATCH if data is not None else I.MISSING, actor="test", reason="found bad"
    )
    return copy


def leftovers(copy: PhysicalCopy) -> list[str]:
    root = Path(copy.location.root_path)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.django_db
def test_a_damaged_copy_is_repaired_in_place_from_the_verified_copy(tmp_path: Path) -> None:
    obj = Object(tmp_path)
    good = obj.copy("good", DATA, integrity=I.VERIFIED, checksum_verified_at=timezone.now())
    bad = damaged(obj)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    copy_repair_run(repair.pk, token=claim(repair), owner="w1")

    assert file_of(bad).read_bytes() == DATA
    assert leftovers(bad) == [bad.relative_path]
    bad.refresh_from_db()
    repair.refresh_from_db()
    assert (bad.pk, bad.integrity, bad.verified_checksum) == (bad.pk, I.VERIFIED, sha(DATA))
    assert (repair.status, repair.source_copy_id) == (Status.COMPLETED, good.pk)
    event = StateEvent.objects.filter(
        entity="physical_copy", object_id=str(bad.pk), field="integrity"
    ).latest("pk")
    assert (event.from_state, event.to_state) == ("mismatch", "verified")
    assert f"from copy {good.pk}" in event.reason


@pytest.mark.django_db
def test_a_missing_copy_is_written_back(tmp_path: Path) -> None:
    obj = Object(tmp_path)
    obj.copy("good", DATA, integrity=I.VERIFIED)
    bad = damaged(obj, data=None)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    copy_repair_run(repair.pk, token=claim(repair), owner="w1")
    assert file_of(bad).read_bytes() == DATA
    bad.refresh_from_db()
    assert bad.integrity == I.VERIFIED


@pytest.mark.django_db
def test_a_damaged_or_unverified_copy_is_never_the_source(tmp_path: Path) -> None:
    obj = Object(tmp_path)
    obj.copy("other_bad", BAD, integrity=I.MISMATCH)
    obj.copy("unverified", DATA, integrity=I.UNVERIFIED)
    remote_site = f.SiteFactory(short_name="us")
    good = obj.copy("far", DATA, site=remote_site, integrity=I.VERIFIED)
    bad = damaged(obj)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    copy_repair_run(repair.pk, token=claim(repair), owner="w1")
    repair.refresh_from_db()
    assert repair.source_copy_id == good.pk
    assert file_of(bad).read_bytes() == DATA


@pytest.mark.django_db
def test_a_source_at_the_same_site_is_preferred(tmp_path: Path) -> None:
    obj = Object(tmp_path)
    obj.copy("far", DATA, site=f.SiteFactory(short_name="us"), integrity=I.VERIFIED)
    near = obj.copy("near", DATA, integrity=I.VERIFIED, checksum_verified_at=timezone.now())
    bad = damaged(obj)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    copy_repair_run(repair.pk, token=claim(repair), owner="w1")
    repair.refresh_from_db()
    assert repair.source_copy_id == near.pk


@pytest.mark.django_db
def test_a_source_that_reads_back_bad_is_marked_and_the_next_one_used(tmp_path: Path) -> None:
    obj = Object(tmp_path)
    # Verified once, rotten since: the repair finds out while reading it.
    rotten = obj.copy("near", BAD, integrity=I.VERIFIED, checksum_verified_at=timezone.now())
    good = obj.copy("far", DATA, site=f.SiteFactory(short_name="us"), integrity=I.VERIFIED)
    bad = damaged(obj)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    copy_repair_run(repair.pk, token=claim(repair), owner="w1")
    repair.refresh_from_db()
    rotten.refresh_from_db()
    assert repair.source_copy_id == good.pk
    assert rotten.integrity == I.MISMATCH
    assert CopyRepair.objects.filter(physical_copy=rotten, status=Status.PENDING).count() == 1
    assert file_of(bad).read_bytes() == DATA


@pytest.mark.django_db
def test_without_a_good_copy_the_repair_fails_for_good_with_a_clear_message(
    tmp_path: Path,
) -> None:
    obj = Object(tmp_path)
    obj.copy("unverified", DATA, integrity=I.UNVERIFIED)
    bad = damaged(obj)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    token = claim(repair)
    with pytest.raises(NoGoodSource) as caught:
        repair_physical_copy(repair.pk, claim_token=token)
    assert isinstance(caught.value, NonRetryableError)
    assert "no live VERIFIED copy" in str(caught.value)
    repair_physical_copy.on_failure(
        caught.value, "task-id", (repair.pk,), {"claim_token": token}, None
    )
    repair.refresh_from_db()
    assert repair.status == Status.FAILED
    assert "no live VERIFIED copy" in repair.failure_error_message
    assert file_of(bad).read_bytes() == BAD
    assert leftovers(bad) == [bad.relative_path]
    bad.refresh_from_db()
    assert bad.integrity == I.MISMATCH


@pytest.mark.django_db
def test_a_repair_killed_mid_copy_is_recovered_and_its_retry_cleans_up(
    tmp_path: Path, settings: Any
) -> None:
    obj = Object(tmp_path)
    obj.copy("good", DATA, integrity=I.VERIFIED)
    bad = damaged(obj)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    claim(repair)
    # What a SIGKILL mid-copy leaves: the row in progress with a lease that runs out, and a
    # half-written temporary file next to the damaged copy.
    CopyRepair.objects.filter(pk=repair.pk).update(
        status=Status.IN_PROGRESS, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    temp = Path(bad.location.root_path) / repair_temp_path(bad.relative_path, repair.pk)
    temp.write_bytes(DATA[:100])
    assert recover_expired_leases()["copy_repair"] == 1
    repair.refresh_from_db()
    assert (repair.status, repair.retry_count) == (Status.PENDING, 1)

    copy_repair_run(repair.pk, token=claim(repair), owner="w2")
    assert file_of(bad).read_bytes() == DATA
    assert leftovers(bad) == [bad.relative_path]
    repair.refresh_from_db()
    assert repair.status == Status.COMPLETED
    # Run again with the old token: the claim is gone, nothing happens.
    with pytest.raises(Exception, match="no longer holds"):
        copy_repair_run(repair.pk, token="stale", owner="w3")


@pytest.mark.django_db
def test_a_copy_verified_again_meanwhile_needs_no_copy(tmp_path: Path) -> None:
    obj = Object(tmp_path)
    obj.copy("good", DATA, integrity=I.VERIFIED)
    bad = damaged(obj, data=DATA)  # marked, but the bytes are fine (an operator restored them)
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    PhysicalCopy.objects.filter(pk=bad.pk).update(integrity=I.VERIFIED)
    copy_repair_run(repair.pk, token=claim(repair), owner="w1")
    repair.refresh_from_db()
    assert repair.status == Status.COMPLETED and repair.source_copy_id is None


@pytest.mark.django_db(transaction=True)
def test_the_repair_manager_dispatches_to_the_damaged_copys_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[Any, str]] = []
    monkeypatch.setattr(
        repair_physical_copy,
        "apply_async",
        lambda args, kwargs, queue: sent.append((args[0], queue)),
    )
    obj = Object(tmp_path)
    obj.copy("good", DATA, integrity=I.VERIFIED)
    bad = damaged(obj)
    assert repair_manager_tick(owner="m") == {"claimed": 1}
    assert repair_manager_tick(owner="m") == {"claimed": 0}
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    assert sent == [(repair.pk, "cologne_bad_integrity_check")]


@pytest.mark.django_db
def test_a_damaged_s3_copy_is_repaired_from_a_disk_copy(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_ACCESS_KEY_ID", TEST_KEY_ID)
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_SECRET_ACCESS_KEY", TEST_SECRET)
    bucket = new_bucket(moto_endpoint)
    obj = Object(tmp_path)
    good = obj.copy("buffer", DATA, integrity=I.VERIFIED)
    lta = f.DataLocationFactory(
        site=obj.site,
        name="lta",
        location_type="long_term_archive",
        storage_type="s3",
        root_path="",
        s3_endpoint_url=moto_endpoint,
        s3_bucket=bucket,
        s3_region="us-east-1",
        s3_prefix="ccat",
    )
    bad = f.PhysicalCopyFactory(
        raw_data_package=obj.package,
        location=lta,
        integrity=I.VERIFIED,
        verified_checksum=sha(DATA),
    )
    client = raw_s3_client(moto_endpoint)
    key = f"ccat/{bad.relative_path}"
    client.put_object(Bucket=bucket, Key=key, Body=BAD)
    assert integrity.copy_verify(bad, actor="test") == "mismatch"
    [repair] = CopyRepair.objects.filter(physical_copy=bad)
    copy_repair_run(repair.pk, token=claim(repair), owner="w1")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == DATA
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == [key]
    repair.refresh_from_db()
    assert repair.source_copy_id == good.pk


# --- Storage.rename ------------------------------------------------------------------------------
def test_rename_replaces_the_target_and_removes_the_source(backend: Backend) -> None:
    storage = backend.storage
    storage.put_stream("p/a.tar", io.BytesIO(b"old bytes"), algorithm="sha256")
    storage.put_stream("p/a.tar.repair-7", io.BytesIO(b"new bytes"), algorithm="sha256")
    storage.rename("p/a.tar.repair-7", "p/a.tar")
    with storage.get_stream("p/a.tar") as reader:
        assert reader.read() == b"new bytes"
    assert not storage.exists("p/a.tar.repair-7")
    assert list(storage.list()) == ["p/a.tar"]


def test_rename_of_nothing_is_object_not_found(backend: Backend) -> None:
    backend.storage.put_stream("p/a.tar", io.BytesIO(b"kept"), algorithm="sha256")
    with pytest.raises(ObjectNotFound):
        backend.storage.rename("p/missing", "p/a.tar")
    with backend.storage.get_stream("p/a.tar") as reader:
        assert reader.read() == b"kept"
