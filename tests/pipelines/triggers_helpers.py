"""Builders shared by the trigger-manager tests (tests/pipelines/test_triggers*.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.utils import timezone

from pipelines.models import (
    ExecutedReductionStep,
    PackageState,
    Pipeline,
    RawDataPackage,
    ReductionStep,
    RunStatus,
)
from pipelines.services.triggers import trigger_manager_tick
from tests.factories import (
    DataGroupingFactory,
    ExecutedObsUnitFactory,
    PipelineFactory,
    RawDataPackageFactory,
    ReductionStepFactory,
)


def archived(scan: Any = None, *, at: datetime | None = None, **kwargs: Any) -> RawDataPackage:
    """An ARCHIVED package of ``scan`` (a new scan when None), archived ``at`` (now)."""
    return RawDataPackageFactory(
        executed_obs_unit=scan or ExecutedObsUnitFactory(),
        state=PackageState.ARCHIVED,
        archived_at=at or timezone.now(),
        **kwargs,
    )


def pipeline(**kwargs: Any) -> Pipeline:
    """A CONTINUOUS pipeline over every archived package (the factory grouping's rule)."""
    return PipelineFactory(**kwargs)


def step(pipeline: Pipeline, *, upstream: list[ReductionStep] = (), **kwargs: Any) -> ReductionStep:  # type: ignore[assignment]
    kwargs.setdefault("cooldown_seconds", 0)
    made = ReductionStepFactory(pipeline=pipeline, **kwargs)
    if upstream:
        made.depends_on.add(*upstream)
    return made


def chain(**pipeline_kwargs: Any) -> tuple[Pipeline, ReductionStep, ReductionStep]:
    """A pipeline with two steps per scan: "calibrate", then a step depending on it."""
    p = pipeline(**pipeline_kwargs)
    calibrate = step(p, step_order=1)
    return p, calibrate, step(p, step_order=2, upstream=[calibrate])


def grouping_without_state_rule() -> Any:
    return DataGroupingFactory(filter_rules=[])


def tick(now: datetime | None = None) -> dict[str, int]:
    return trigger_manager_tick(owner="test", now=now)


def runs_of(s: ReductionStep) -> list[ExecutedReductionStep]:
    return list(ExecutedReductionStep.objects.filter(reduction_step=s).order_by("pk"))


def inputs(run: ExecutedReductionStep) -> set[int]:
    return set(run.input_raw_packages.values_list("pk", flat=True))


def finish(run: ExecutedReductionStep, status: str, *, for_good: bool = False) -> None:
    """Put a run in a final-looking state for the test (what the workflow and result managers
    would have done), stamping updated_at as a state change does."""
    ExecutedReductionStep.objects.filter(pk=run.pk).update(
        status=status,
        failed_for_good=for_good and status == RunStatus.FAILED,
        updated_at=timezone.now(),
    )
    run.refresh_from_db()
