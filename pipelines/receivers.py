"""Receivers of the signals of the apps pipelines depends on, connected in
``PipelinesConfig.ready()``. Each only calls one pipelines service: no domain logic here."""

from __future__ import annotations

from typing import Any

from pipelines.services.products import (
    products_mark_stale_for_parameter_set,
    products_refresh_staleness_on_commit,
)
from reduction.models import ParameterSet


def parameter_set_created_mark_stale(
    sender: type[ParameterSet], *, parameter_set: ParameterSet, **kwargs: Any
) -> None:
    """``reduction.signals.parameter_set_created``: products of older versions are stale. Runs in
    the reduction save's transaction; an error here aborts the save."""
    products_mark_stale_for_parameter_set(parameter_set)


# --- Staleness (issue 12, campaigns) -----------------------------------------------------------
def version_or_step_saved_refresh_staleness(sender: type, **kwargs: Any) -> None:
    """``post_save`` of ReductionSoftwareVersion and ReductionStep: what a step resolves to may
    have changed (a new release, ``is_active`` switched, a re-pinned step or a new policy), so
    product staleness is refreshed after the save commits."""
    products_refresh_staleness_on_commit()
