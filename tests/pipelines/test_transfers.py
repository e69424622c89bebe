"""Transfers: the round-robin over primary routes, and the constraints that keep a bundle from
leaving twice or being copied twice to one destination."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction

from pipelines.exceptions import StorageUnavailable
from pipelines.models import DataTransfer, DataTransferRoute, Status
from pipelines.services.transfers import primary_route_next
from tests import factories as f


def _routes() -> tuple[Any, DataTransferRoute, DataTransferRoute]:
    mountain = f.SiteFactory(short_name="ccat")
    cologne, ithaca = f.SiteFactory(short_name="cologne"), f.SiteFactory(short_name="us")
    a = DataTransferRoute.objects.create(
        name="ccat_to_cologne", origin_site=mountain, destination_site=cologne, is_primary=True
    )
    b = DataTransferRoute.objects.create(
        name="ccat_to_us", origin_site=mountain, destination_site=ithaca, is_primary=True
    )
    # A secondary route never takes part in the primary round-robin.
    DataTransferRoute.objects.create(
        name="cologne_to_us", origin_site=cologne, destination_site=ithaca
    )
    return mountain, a, b


@pytest.mark.django_db
def test_behaviour_23_primary_transfers_go_round_robin_over_the_archive_sites() -> None:
    mountain, a, b = _routes()
    picks = [primary_route_next(mountain.pk) for _ in range(3)]
    assert picks == [a, b, a]


@pytest.mark.django_db
def test_an_inactive_route_is_skipped_and_none_active_is_a_retryable_error() -> None:
    mountain, a, b = _routes()
    assert primary_route_next(mountain.pk) == a
    DataTransferRoute.objects.filter(pk=b.pk).update(active=False)
    assert [primary_route_next(mountain.pk) for _ in range(2)] == [a, a]
    DataTransferRoute.objects.filter(pk=a.pk).update(active=False)
    with pytest.raises(StorageUnavailable, match="no active primary route"):
        primary_route_next(mountain.pk)


@pytest.mark.django_db
def test_a_rolled_back_transfer_does_not_advance_the_round_robin() -> None:
    mountain, a, _b = _routes()
    with pytest.raises(RuntimeError), transaction.atomic():
        assert primary_route_next(mountain.pk) == a
        raise RuntimeError("the transfer row could not be created")
    assert primary_route_next(mountain.pk) == a


@pytest.mark.django_db(transaction=True)
def test_two_managers_at_once_keep_the_round_robin(require_postgres: None) -> None:
    mountain, a, b = _routes()
    picked: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(2)

    def manager() -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(10):
                with transaction.atomic():
                    route = primary_route_next(mountain.pk)
                    with lock:
                        picked.append(route.pk)
        finally:
            connection.close()

    threads = [threading.Thread(target=manager) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Each pick happened under the cursor's lock, so in lock order they alternate exactly.
    assert len(picked) == 20
    assert picked == [a.pk, b.pk] * 10


@pytest.mark.django_db
def test_behaviour_24_a_bundle_has_at_most_one_live_primary_transfer() -> None:
    first = f.DataTransferFactory(is_primary=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        f.DataTransferFactory(data_transfer_package=first.data_transfer_package, is_primary=True)
    DataTransfer.objects.filter(pk=first.pk).update(status=Status.FAILED)
    # After a failure the bundle may leave again, by another primary transfer.
    f.DataTransferFactory(data_transfer_package=first.data_transfer_package, is_primary=True)


@pytest.mark.django_db
def test_one_live_transfer_per_bundle_and_destination() -> None:
    first = f.DataTransferFactory(is_primary=False)
    with pytest.raises(IntegrityError), transaction.atomic():
        f.DataTransferFactory(
            data_transfer_package=first.data_transfer_package,
            destination_location=first.destination_location,
            is_primary=False,
        )
    # Another destination is fine: behaviour 20, one bundle, several transfers.
    f.DataTransferFactory(data_transfer_package=first.data_transfer_package, is_primary=False)
