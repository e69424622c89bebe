"""Transfers between sites: which route a package leaves its observatory by.

The transfer, unpack and bundling managers build on this (see the data-path issue); today it
holds the round-robin over an origin site's primary routes.
"""

from __future__ import annotations

from django.db import transaction

from pipelines.exceptions import StorageUnavailable
from pipelines.models import DataTransferRoute, PrimaryTransferCursor


def primary_route_next(origin_site_id: int) -> DataTransferRoute:
    """The next active primary route out of ``origin_site_id`` in round-robin order (by
    priority, then id): three packages over two archive sites go A, B, A. The cursor row is
    locked until the caller's transaction ends, so call this in the transaction that creates
    the transfer: two managers at once then alternate instead of both taking A, and a rolled
    back transfer does not advance the cursor. Raises ``StorageUnavailable`` (retryable: an
    operator may activate one) when the site has no active primary route."""
    with transaction.atomic():
        PrimaryTransferCursor.objects.get_or_create(origin_site_id=origin_site_id)
        cursor = PrimaryTransferCursor.objects.select_for_update().get(pk=origin_site_id)
        routes = list(
            DataTransferRoute.objects.filter(
                origin_site_id=origin_site_id, is_primary=True, active=True
            ).order_by("-priority", "pk")
        )
        if not routes:
            raise StorageUnavailable(f"site {origin_site_id} has no active primary route")
        ids = [route.pk for route in routes]
        position = ids.index(cursor.last_route_id) + 1 if cursor.last_route_id in ids else 0
        route = routes[position % len(routes)]
        cursor.last_route = route
        cursor.save(update_fields=["last_route", "updated_at"])
    return route
