"""Creating a run from a trigger decision: the software version its step's policy picks, the
configuration frozen into it, and the PENDING row with its inputs, made in a savepoint so a
(step, sub-group) another manager took meanwhile is skipped, never an error. Used by the
trigger manager, the manual trigger and campaigns (``services.campaigns``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from django.db import IntegrityError, transaction

from pipelines.models import (
    DataProduct,
    ExecutedReductionStep,
    ReductionSoftwareVersion,
    ReductionStep,
    RunStatus,
    VersionPolicy,
)
from pipelines.services.states import record_creation

from .gap import Decision, RunInputs

log = logging.getLogger(__name__)

RunProducts = ExecutedReductionStep.input_products.through


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:4])


def step_software_version(step: ReductionStep) -> ReductionSoftwareVersion | None:
    """The version a new run of ``step`` uses, by its policy: PINNED the referenced version;
    LATEST the newest active version of the step's software; COMPATIBLE the newest active one
    with the referenced version's major number (LATEST when there is no reference). "Newest"
    compares the numeric parts of the version string (1.10.0 > 1.9.3). None when no version
    qualifies (the workflow manager fails such a run with that reason)."""
    if step.version_policy == VersionPolicy.PINNED:
        return step.software_version
    candidates = list(
        ReductionSoftwareVersion.objects.filter(software=step.software, is_active=True)
    )
    if step.version_policy == VersionPolicy.COMPATIBLE and step.software_version is not None:
        major = _version_key(step.software_version.version)[:1]
        candidates = [v for v in candidates if _version_key(v.version)[:1] == major]
        if not candidates:
            return step.software_version
    if not candidates:
        return step.software_version
    return max(candidates, key=lambda v: (_version_key(v.version), v.created_at))


def run_config_snapshot(step: ReductionStep) -> dict[str, Any]:
    """What the run will be given, frozen at creation: the step's parameter set (``parameters``,
    read by the manifest), its resources and grouping."""
    config = step.config
    return {
        "config": config.name if config else "",
        "parameters": dict(config.parameters) if config else {},
        "resource_requirements": dict(step.resource_requirements or {}),
        "group_by": list(step.group_by or []),
    }


def insert_run(
    step: ReductionStep,
    *,
    key: str,
    values: dict[str, Any],
    package_ids: Sequence[int],
    excluded: list[Any],
    upstream_run_ids: Sequence[int],
    product_ids: Sequence[int] | None = None,
    triggered_by: str,
    actor: str,
    reason: str,
    **fields: Any,
) -> ExecutedReductionStep:
    """Insert a PENDING run of ``step`` for one sub-group with its input packages and upstream
    products (``product_ids``, else every product of ``upstream_run_ids``, read only now that a
    run is made of them) and its creation event. ``fields``: more columns (campaign, replaces).
    Raises ``IntegrityError`` when another run occupies the (step, sub-group); callers wrap it
    in a savepoint."""
    run = ExecutedReductionStep.objects.create(
        reduction_step=step,
        sub_group_key=key,
        sub_group_values=values,
        status=RunStatus.PENDING,
        triggered_by=triggered_by,
        max_retries=step.max_retries,
        software_version=step_software_version(step),
        config_snapshot=run_config_snapshot(step),
        excluded_inputs=excluded,
        **fields,
    )
    RunInputs.objects.bulk_create(
        [RunInputs(executedreductionstep_id=run.pk, rawdatapackage_id=p) for p in package_ids]
    )
    if product_ids is None and upstream_run_ids:
        product_ids = list(
            DataProduct.objects.filter(produced_by_id__in=list(upstream_run_ids)).values_list(
                "pk", flat=True
            )
        )
    if product_ids:
        RunProducts.objects.bulk_create(
            [RunProducts(executedreductionstep_id=run.pk, dataproduct_id=p) for p in product_ids]
        )
    record_creation(run, actor=actor, reason=reason[:1000])
    return run


def create_run(
    decision: Decision, *, triggered_by: str, actor: str
) -> ExecutedReductionStep | None:
    """Insert the PENDING run of a decision with its inputs, in a savepoint. Returns None when
    the database refused it because another run occupies the (step, sub-group) meanwhile (the
    unique constraint: another manager won the race)."""
    step = decision.step
    try:
        with transaction.atomic():
            run = insert_run(
                step,
                key=decision.key,
                values=decision.values,
                package_ids=decision.package_ids,
                excluded=decision.excluded,
                upstream_run_ids=decision.upstream_run_ids,
                triggered_by=triggered_by,
                actor=actor,
                reason=f"{len(decision.package_ids)} packages, {len(decision.gap)} new"
                + (f", {len(decision.excluded)} left out" if decision.excluded else ""),
            )
    except IntegrityError as exc:
        log.info("%s [%s]: not created, the sub-group is occupied: %s", step, decision.key, exc)
        return None
    decision.run = run
    return run
