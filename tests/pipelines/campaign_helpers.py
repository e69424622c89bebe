"""Builders shared by the campaign tests (test_campaigns*, test_backfill, test_reprocess,
test_staleness, test_trigger_command): pipelines of archived scans at known start times, runs
finished with products the way the result manager leaves them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.apps import apps
from django.db import connection
from django.utils import timezone

from pipelines.models import (
    DataProduct,
    ExecutedReductionStep,
    PackageState,
    Pipeline,
    RawDataPackage,
    ReductionSoftwareVersion,
    ReductionStep,
    RunStatus,
    StateEvent,
    VersionPolicy,
)
from tests.factories import (
    DataProductFactory,
    ExecutedObsUnitFactory,
    PipelineFactory,
    RawDataPackageFactory,
    ReductionSoftwareFactory,
    ReductionSoftwareVersionFactory,
    ReductionStepFactory,
)

MARCH = datetime(2026, 3, 1, tzinfo=UTC)


def scan_package(day: int, **kwargs: Any) -> RawDataPackage:
    """An ARCHIVED package of a new scan that started on March ``day`` 2026 at noon."""
    scan = ExecutedObsUnitFactory(start_time=MARCH + timedelta(days=day - 1, hours=12))
    return RawDataPackageFactory(
        executed_obs_unit=scan,
        state=PackageState.ARCHIVED,
        archived_at=timezone.now(),
        **kwargs,
    )


def versioned_step(pipeline: Pipeline, name: str, *, order: int, **kwargs: Any) -> ReductionStep:
    """A step of ``pipeline`` on its own software with version 1.0.0 referenced (COMPATIBLE)."""
    software = ReductionSoftwareFactory()
    version = ReductionSoftwareVersionFactory(software=software, version="1.0.0")
    kwargs.setdefault("cooldown_seconds", 0)
    kwargs.setdefault("max_retries", 0)
    return ReductionStepFactory(
        pipeline=pipeline,
        name=name,
        step_order=order,
        software=software,
        software_version=version,
        version_policy=VersionPolicy.COMPATIBLE,
        **kwargs,
    )


def two_step_pipeline(**kwargs: Any) -> tuple[Pipeline, ReductionStep, ReductionStep]:
    """calibrate (per scan) -> combine (all scans together)."""
    pipeline = PipelineFactory(**kwargs)
    calibrate = versioned_step(pipeline, "calibrate", order=1)
    combine = versioned_step(pipeline, "combine", order=2, group_by=[])
    combine.depends_on.add(calibrate)
    return pipeline, calibrate, combine


def complete(
    run: ExecutedReductionStep,
    *,
    products: int = 1,
    version: ReductionSoftwareVersion | None = None,
) -> list[DataProduct]:
    """Make ``run`` COMPLETED (as the result manager would) with ``products`` science products."""
    ExecutedReductionStep.objects.filter(pk=run.pk).update(
        status=RunStatus.COMPLETED,
        finished_at=timezone.now(),
        updated_at=timezone.now(),
        **({"software_version": version} if version else {}),
    )
    run.refresh_from_db()
    return [
        DataProductFactory(
            produced_by=run, filename=f"out_{i}.npy", relative_path=f"output/science/out_{i}.npy"
        )
        for i in range(products)
    ]


def fail_for_good(run: ExecutedReductionStep) -> None:
    ExecutedReductionStep.objects.filter(pk=run.pk).update(
        status=RunStatus.FAILED, failed_for_good=True, updated_at=timezone.now()
    )
    run.refresh_from_db()


def made_run(
    step: ReductionStep,
    key: str,
    packages: list[RawDataPackage],
    *,
    version: ReductionSoftwareVersion | None = None,
    consumed: list[DataProduct] = (),  # type: ignore[assignment]
    products: int = 1,
) -> tuple[ExecutedReductionStep, list[DataProduct]]:
    """A COMPLETED run of ``step`` over ``packages`` made with ``version`` (the step's)."""
    run = ExecutedReductionStep.objects.create(
        reduction_step=step,
        sub_group_key=key,
        software_version=version or step.software_version,
        max_retries=0,
    )
    run.input_raw_packages.set(packages)
    run.input_products.set(consumed)
    return run, complete(run, products=products)


def row_counts() -> dict[str, int]:
    """Rows of every table of every installed model, and the state events: a dry run must
    leave all of them as they were."""
    counts = {}
    with connection.cursor() as cursor:
        for model in apps.get_models(include_auto_created=True):
            table = model._meta.db_table
            if table in counts:
                continue
            cursor.execute(f'SELECT COUNT(*) FROM "{table}"')
            counts[table] = cursor.fetchone()[0]
    counts["state_event (events)"] = StateEvent.objects.count()
    return counts
