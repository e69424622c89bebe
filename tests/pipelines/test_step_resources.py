"""A step's resources are checked against the configured backend when the step is saved
(``ReductionStep.clean``, issue 12): on SLURM, more than the partition offers is refused then,
not when the first run is submitted. The partition's limits are the backend's cached reading
(the real cluster is tested in tests/pipelines/test_backend_slurm_cluster.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from pipelines.backends import slurm
from tests.factories import ReductionStepFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def small_partition(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """HPC_BACKEND=slurm whose partition "small" offers 2 CPUs, 4 GB and at most 2 hours."""
    settings.HPC_BACKEND = "slurm"
    settings.SLURM_PARTITION = "small"
    limits = slurm.PartitionLimits(name="small", max_cpus=2, max_memory_mb=4096, max_minutes=120)
    monkeypatch.setitem(slurm._PARTITION_CACHE, "small", (time.monotonic(), limits))


@pytest.mark.parametrize(
    ("resources", "named"),
    [
        ({"cpu": 4}, "resource 'cpu' = 4 is beyond SLURM partition 'small'"),
        ({"memory_gb": 16}, "resource 'memory_gb' = 16 is beyond SLURM partition 'small'"),
        ({"time_hours": 3}, "resource 'time_hours' = 3 is beyond SLURM partition 'small'"),
    ],
)
def test_resources_beyond_the_partition_are_refused_when_the_step_is_saved(
    small_partition: None, resources: dict, named: str
) -> None:
    step = ReductionStepFactory()  # saved with the default (no) resources
    step.resource_requirements = resources
    with pytest.raises(ValidationError) as error:
        step.full_clean()
    assert any(named in m for m in error.value.message_dict["resource_requirements"])


def test_resources_the_partition_offers_are_accepted(small_partition: None) -> None:
    step = ReductionStepFactory(resource_requirements={"cpu": 2, "memory_gb": 4, "time_hours": 2})
    step.full_clean()


def test_the_shape_check_speaks_first_and_the_local_backend_adds_no_limits(settings: Any) -> None:
    settings.HPC_BACKEND = "local"
    step = ReductionStepFactory(resource_requirements={"cpu": 512})
    step.full_clean()
    step.resource_requirements = {"gpus": 1}
    with pytest.raises(ValidationError, match="unknown resource 'gpus'"):
        step.full_clean()
