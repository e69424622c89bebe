"""The overview page: counts, recent scans, and where each recent package's tar is."""

from __future__ import annotations

import pytest

from pipelines.models import DataLocation
from tests import factories as f

pytestmark = pytest.mark.django_db


def test_the_overview_lists_recent_packages_with_their_buffer(client) -> None:
    client.force_login(f.UserFactory())
    buffer = f.DataLocationFactory(
        site=f.SiteFactory(short_name="ccat"),
        name="buffer",
        location_type=DataLocation.LocationType.BUFFER,
    )
    built = f.RawDataPackageFactory(status="completed", origin_location=buffer, name="built.tar")
    f.RawDataPackageFactory(status="pending", name="planned.tar")

    body = client.get("/").content.decode()

    assert "built.tar" in body and "planned.tar" in body
    assert "ccat:buffer" in body
    assert built.checksum[:16] in body


def test_the_overview_costs_the_same_queries_for_many_packages(
    client, django_assert_max_num_queries
) -> None:
    client.force_login(f.UserFactory())
    f.RawDataPackageFactory(origin_location=f.DataLocationFactory())
    with django_assert_max_num_queries(12) as few:
        client.get("/")
    for _ in range(30):
        f.RawDataPackageFactory(origin_location=f.DataLocationFactory())
    with django_assert_max_num_queries(len(few.captured_queries)):
        client.get("/")
