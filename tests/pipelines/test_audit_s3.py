"""The storage audit of an S3 location (moto's standalone server): keys under the prefix are
compared like files, dark objects recorded and left alone, lost copies marked after a HEAD."""

from __future__ import annotations

import io

import pytest

from pipelines.models import DarkFile, DataLocation, PhysicalCopy
from pipelines.services.audit import audit_storage
from pipelines.storage.base import storage_for
from tests import factories as f
from tests.pipelines.test_storage_contract import (
    TEST_KEY_ID,
    TEST_SECRET,
    moto_endpoint,
    new_bucket,
    raw_s3_client,
)

__all__ = ["moto_endpoint"]  # a fixture, used by name
pytestmark = pytest.mark.django_db


def test_an_s3_location_is_audited_under_its_prefix(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(moto_endpoint)
    location = f.DataLocationFactory(
        site=f.SiteFactory(short_name="cologne"),
        name="lta",
        location_type=DataLocation.LocationType.LONG_TERM_ARCHIVE,
        storage_type=DataLocation.StorageType.S3,
        root_path="",
        s3_endpoint_url=moto_endpoint,
        s3_bucket=bucket,
        s3_region="us-east-1",
        s3_prefix="ccat/raw",
    )
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_ACCESS_KEY_ID", TEST_KEY_ID)
    monkeypatch.setenv("WORKFLOW_S3_COLOGNE_LTA_SECRET_ACCESS_KEY", TEST_SECRET)
    storage = storage_for(location)
    for path, size in (("p/a.tar", 10), ("p/b.tar", 20), ("p/c.tar.tmp", 5), ("q/z", 7)):
        storage.put_stream(path, io.BytesIO(b"x" * size), algorithm="sha256")
    client = raw_s3_client(moto_endpoint)
    client.put_object(Bucket=bucket, Key="elsewhere/p/b.tar", Body=b"not ours")
    client.put_object(Bucket=bucket, Key="ccat/raw/p/", Body=b"")  # a "directory" marker
    known = f.PhysicalCopyFactory(
        raw_data_package=f.RawDataPackageFactory(relative_path="p/a.tar"), location=location
    )
    f.PhysicalCopyFactory(
        raw_data_package=f.RawDataPackageFactory(relative_path="q/z"), location=location
    )
    lost = f.PhysicalCopyFactory(
        raw_data_package=f.RawDataPackageFactory(relative_path="p/gone.tar"), location=location
    )

    report = audit_storage(location, chunk_size=2)

    assert (report.files_seen, report.known, report.skipped_temporary) == (4, 2, 1)
    assert list(DarkFile.objects.values_list("relative_path", "size_bytes")) == [("p/b.tar", 20)]
    assert (report.lost_marked, report.lost_paths) == (1, ["p/gone.tar"])
    lost.refresh_from_db()
    known.refresh_from_db()
    assert lost.integrity == PhysicalCopy.Integrity.MISSING
    assert known.integrity != PhysicalCopy.Integrity.MISSING
    # Nothing was deleted from the bucket.
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        "ccat/raw/p/",
        "ccat/raw/p/a.tar",
        "ccat/raw/p/b.tar",
        "ccat/raw/p/c.tar.tmp",
        "ccat/raw/q/z",
        "elsewhere/p/b.tar",
    ]
