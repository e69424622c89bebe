"""Data products: marking them stale when what made them has been superseded."""

from __future__ import annotations

from django.utils import timezone

from pipelines.models import DataProduct
from reduction.models import ParameterSet


def products_mark_stale_for_parameter_set(parameter_set: ParameterSet) -> int:
    """Mark the products made with an older version of ``parameter_set``'s instrument parameters
    stale, once: products already stale keep their first date and reason. Returns how many were
    marked.

    One conditional UPDATE in the caller's transaction. The reduction save calls it (through
    ``reduction.signals.parameter_set_created``, see ``pipelines.receivers``) inside its own
    transaction, so the marks commit or roll back together with the new version.
    """
    instrument_key = parameter_set.instrument
    reason = (
        f"made with older {instrument_key} reduction parameters; v{parameter_set.number} is current"
    )
    return DataProduct.objects.filter(
        produced_by__parameter_set__instrument=instrument_key,
        produced_by__parameter_set__number__lt=parameter_set.number,
        stale_since__isnull=True,
    ).update(stale_since=timezone.now(), stale_reason=reason[:500])
