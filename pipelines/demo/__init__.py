"""The demo facility and its simulated observations: data for a laptop demo and for tests, not a
service. ``facility`` defines and loads the observatory, sites, storage and users; ``simulate``
runs seeded scans through the ingest service; ``reduction`` is the demo reduction program the
demo pipelines run (standalone: no Django). The names commands and tests use are re-exported
here, imported on first use, so that ``python -m pipelines.demo.reduction`` starts without
Django (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.demo.facility import (
        ADMIN_USERNAME,
        DEFAULT_PASSWORD,
        DemoFacility,
        demo_facility_load,
    )
    from pipelines.demo.simulate import DemoNotLoaded, demo_observations_simulate

# Re-exported name -> the module that defines it.
_EXPORTS = {
    "ADMIN_USERNAME": "pipelines.demo.facility",
    "DEFAULT_PASSWORD": "pipelines.demo.facility",
    "DemoFacility": "pipelines.demo.facility",
    "demo_facility_load": "pipelines.demo.facility",
    "DemoNotLoaded": "pipelines.demo.simulate",
    "demo_observations_simulate": "pipelines.demo.simulate",
}

__all__ = [
    "ADMIN_USERNAME",
    "DEFAULT_PASSWORD",
    "DemoFacility",
    "DemoNotLoaded",
    "demo_facility_load",
    "demo_observations_simulate",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
