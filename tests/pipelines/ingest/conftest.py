"""Fixtures every ingest test module uses: a SOURCE location on disk, a scan and a module."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipelines.models import DataLocation, ExecutedObsUnit
from tests import factories as f

# The scans' start time; test modules import it from here.
T0 = datetime(2025, 3, 1, 4, 0, tzinfo=UTC)


@pytest.fixture
def source(tmp_path: Path) -> DataLocation:
    root = tmp_path / "ccat" / "chai_raw_data"
    root.mkdir(parents=True)
    return f.DataLocationFactory(
        name="chai_raw_data",
        location_type=DataLocation.LocationType.SOURCE,
        root_path=str(root),
    )


@pytest.fixture
def scan() -> ExecutedObsUnit:
    return f.ExecutedObsUnitFactory(start_time=T0)


@pytest.fixture
def module() -> Any:
    return f.InstrumentModuleFactory(name="LFA")
