"""The demo facility and its simulated observations: data for a laptop demo and for tests, not a
service. ``facility`` defines and loads the observatory, sites, storage and users; ``simulate``
runs seeded scans through the ingest service. The names commands and tests use are re-exported
here."""

from pipelines.demo.facility import (
    ADMIN_USERNAME,
    DEFAULT_PASSWORD,
    DemoFacility,
    demo_facility_load,
)
from pipelines.demo.simulate import DemoNotLoaded, demo_observations_simulate

__all__ = [
    "ADMIN_USERNAME",
    "DEFAULT_PASSWORD",
    "DemoFacility",
    "DemoNotLoaded",
    "demo_facility_load",
    "demo_observations_simulate",
]
