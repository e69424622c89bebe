"""Data products: staleness from provenance, and supersession by reprocessing.

A product is **stale** when what made it is no longer what would make it now:

- the software version its run used is not the one its step's version policy resolves to today
  (``triggers.step_software_version``: a new compatible release, a re-pinned step, a policy
  change, a version switched off);
- the instrument ``ParameterSet`` its run used is older than the instrument's latest one;
- or an upstream product its run consumed (``run.input_products``) is stale: staleness
  propagates along lineage, however many steps down.

Staleness belongs to a run (all products of a run share their provenance), so the service
decides per run and writes the products of each run. ``stale_since`` keeps the first moment a
product was found stale; ``stale_reason`` says why in words (the admin and ``manage.py why``
show it). A product whose cause went away (the new version was switched off again) is fresh
again. Superseded products are history: they are never re-judged.

A product is **superseded** when a reprocessing run that replaces its run completed
(``products_supersede``): it keeps its files, copies and lineage, and ``superseded_by`` points
at the product of the new run with the same path (or the same type).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from pipelines.models import (
    DataProduct,
    ExecutedReductionStep,
    ReductionSoftwareVersion,
    ReductionStep,
    RunStatus,
)
from reduction.models import ParameterSet

log = logging.getLogger(__name__)

RunProducts = ExecutedReductionStep.input_products.through
_REASON_LIMIT = 500


def products_mark_stale_for_parameter_set(parameter_set: ParameterSet) -> int:
    """Mark the products made with an older version of ``parameter_set``'s instrument parameters
    stale, once: products already stale keep their first date and reason. Returns how many were
    marked.

    One conditional UPDATE in the caller's transaction. The reduction save calls it (through
    ``reduction.signals.parameter_set_created``, see ``pipelines.receivers``) inside its own
    transaction, so the marks commit or roll back together with the new version. The products
    downstream of them are marked by ``products_refresh_staleness``, queued here after commit.
    """
    instrument_key = parameter_set.instrument
    reason = (
        f"made with older {instrument_key} reduction parameters; v{parameter_set.number} is current"
    )
    marked = DataProduct.objects.filter(
        produced_by__parameter_set__instrument=instrument_key,
        produced_by__parameter_set__number__lt=parameter_set.number,
        stale_since__isnull=True,
        superseded_at__isnull=True,
    ).update(stale_since=timezone.now(), stale_reason=reason[:_REASON_LIMIT])
    products_refresh_staleness_on_commit()
    return marked


@dataclass
class StalenessReport:
    """What one ``products_refresh_staleness`` found: runs judged stale, products newly marked
    stale, products found fresh again."""

    stale_runs: int = 0
    marked: int = 0
    cleared: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"stale_runs": self.stale_runs, "marked": self.marked, "cleared": self.cleared}


def stale_run_reasons() -> dict[int, str]:
    """Every run with live (not superseded) products or consumers that is stale, with the
    reason in words: {run id: reason}. Reads only; a handful of queries whatever the number of
    runs (one per step for the version policy, one for the parameter sets, one for lineage).
    """
    from pipelines.services.triggers import step_software_version

    direct: dict[int, str] = {}
    # 1. Software versions: runs whose version is not what their step resolves to now. Steps
    # are resolved once per (software, policy, referenced version) and their runs read with one
    # query per version resolved to, so the cost follows the number of versions, not of steps.
    step_ids = (
        ExecutedReductionStep.objects.filter(products__isnull=False)
        .values_list("reduction_step_id", flat=True)
        .distinct()
    )
    steps = ReductionStep.objects.filter(pk__in=list(step_ids)).select_related(
        "software", "software_version"
    )
    resolved: dict[tuple[int, str, int | None], ReductionSoftwareVersion | None] = {}
    by_version: dict[int, list[ReductionStep]] = defaultdict(list)
    versions: dict[int, ReductionSoftwareVersion] = {}
    for step in steps:
        key = (step.software_id, step.version_policy, step.software_version_id)
        if key not in resolved:
            resolved[key] = step_software_version(step)
        current = resolved[key]
        if current is not None:
            by_version[current.pk].append(step)
            versions[current.pk] = current
    for version_id, version_steps in by_version.items():
        current = versions[version_id]
        named = {s.pk: s for s in version_steps}
        runs = (
            ExecutedReductionStep.objects.filter(
                reduction_step_id__in=list(named), products__isnull=False
            )
            .exclude(software_version__isnull=True)
            .exclude(software_version_id=version_id)
            .values_list("pk", "reduction_step_id", "software_version__version")
            .distinct()
        )
        for run_id, step_id, version in runs:
            step = named[step_id]
            direct[run_id] = (
                f"made with {step.software.name} {version}; step {step.name} now uses "
                f"{current.version} ({step.get_version_policy_display().lower()})"
            )
    # 2. Instrument parameters: runs whose parameter set is not the instrument's latest.
    latest = dict(
        ParameterSet.objects.values("instrument")
        .annotate(number=Max("number"))
        .values_list("instrument", "number")
    )
    if latest:
        older = Q()
        for instrument, number in latest.items():
            older |= Q(parameter_set__instrument=instrument, parameter_set__number__lt=number)
        older_runs = (
            ExecutedReductionStep.objects.filter(older, products__isnull=False)
            .values_list("pk", "parameter_set__instrument", "parameter_set__number")
            .distinct()
        )
        for run_id, instrument, number in older_runs:
            direct.setdefault(
                run_id,
                f"made with {instrument} reduction parameters v{number}; "
                f"v{latest[instrument]} is current",
            )
    # 3. Lineage: a run that consumed a product of a stale run is stale (breadth first, so the
    # reason names the nearest stale upstream).
    consumers: dict[int, set[int]] = defaultdict(set)
    for consumer, producer in RunProducts.objects.values_list(
        "executedreductionstep_id", "dataproduct__produced_by_id"
    ).distinct():
        consumers[producer].add(consumer)
    reasons = dict(direct)
    frontier = list(direct)
    steps_by_run: dict[int, str] = {}
    if consumers:
        steps_by_run = dict(
            ExecutedReductionStep.objects.filter(
                pk__in=set(consumers) | {c for cs in consumers.values() for c in cs}
            ).values_list("pk", "reduction_step__name")
        )
    while frontier:
        following: list[int] = []
        for producer in frontier:
            for consumer in consumers.get(producer, ()):
                if consumer in reasons:
                    continue
                root = reasons[producer]
                if root.startswith("consumed "):
                    root = root.split(": ", 1)[-1]
                reasons[consumer] = (
                    f"consumed stale products of run {producer} "
                    f"(step {steps_by_run.get(producer, '?')}): {root}"
                )
                following.append(consumer)
        frontier = following
    return reasons


def products_refresh_staleness() -> StalenessReport:
    """Bring every live product's ``stale_since``/``stale_reason`` in line with its provenance
    (module docstring): mark the products of stale runs that are not marked yet (their first
    date is kept when already marked, the reason is updated), clear the marks of products whose
    run is no longer stale. Superseded products are left as they are. Safe to run at any time
    and from several processes (each UPDATE is conditional). Returns the counts."""
    if not DataProduct.objects.exists():
        return StalenessReport()  # a fresh installation: nothing to judge
    reasons = stale_run_reasons()
    report = StalenessReport(stale_runs=len(reasons))
    now = timezone.now()
    live = DataProduct.objects.filter(superseded_at__isnull=True)
    by_reason: dict[str, list[int]] = defaultdict(list)
    for run_id, reason in reasons.items():
        by_reason[reason[:_REASON_LIMIT]].append(run_id)
    with transaction.atomic():
        for reason, run_ids in by_reason.items():
            for start in range(0, len(run_ids), 5000):
                chunk = run_ids[start : start + 5000]
                report.marked += live.filter(
                    produced_by_id__in=chunk, stale_since__isnull=True
                ).update(stale_since=now, stale_reason=reason)
                live.filter(produced_by_id__in=chunk, stale_since__isnull=False).exclude(
                    stale_reason=reason
                ).update(stale_reason=reason)
        report.cleared = (
            live.filter(stale_since__isnull=False)
            .exclude(produced_by_id__in=list(reasons))
            .update(stale_since=None, stale_reason="")
        )
    if report.marked or report.cleared:
        log.info("staleness refreshed: %s", report.as_dict())
    return report


def products_refresh_staleness_on_commit() -> None:
    """Refresh staleness after the current transaction commits (at once outside one): the hook
    every place that changes what a step resolves to calls (software versions and steps saved,
    parameter sets created). An error is logged, never raised: the change itself committed,
    and the campaign manager's periodic refresh is the safety net."""

    def refresh() -> None:
        try:
            products_refresh_staleness()
        except Exception:
            log.exception("refreshing product staleness failed; the next periodic refresh retries")

    transaction.on_commit(refresh)


def products_supersede(run: ExecutedReductionStep) -> int:
    """Mark the products of the run that ``run`` replaces (``run.replaces``) superseded by
    ``run``'s products, once ``run`` has COMPLETED: each old product points at the new product
    with the same relative path, else the first new product of the same type, else nothing
    (``superseded_at`` is set all the same). Nothing is deleted. Conditional on
    ``superseded_at`` being empty, so running it twice changes nothing. Returns how many
    products were marked."""
    if run.replaces_id is None or run.status != RunStatus.COMPLETED:
        return 0
    new = list(DataProduct.objects.filter(produced_by=run).order_by("pk"))
    by_path = {p.relative_path: p for p in new}
    by_type: dict[str, DataProduct] = {}
    for product in new:
        by_type.setdefault(product.product_type, product)
    now = timezone.now()
    marked = 0
    with transaction.atomic():
        for old in DataProduct.objects.filter(
            produced_by_id=run.replaces_id, superseded_at__isnull=True
        ):
            successor = by_path.get(old.relative_path) or by_type.get(old.product_type)
            marked += DataProduct.objects.filter(pk=old.pk, superseded_at__isnull=True).update(
                superseded_by=successor, superseded_at=now
            )
    return marked


def product_staleness_sentence(product: DataProduct) -> str:
    """Why the product is (not) current, in one clause, for ``why`` and the admin."""
    if product.superseded_at is not None:
        successor = (
            f"product {product.superseded_by_id}" if product.superseded_by_id else "a newer run"
        )
        return f"superseded by {successor} since {product.superseded_at:%Y-%m-%d %H:%M}"
    if product.stale_since is not None:
        return f"stale since {product.stale_since:%Y-%m-%d %H:%M}: {product.stale_reason}"
    return "current"
