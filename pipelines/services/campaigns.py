"""Campaigns: backfills and reprocessing, throttled and resumable (issue 12).

A **campaign** (``Campaign``) is one operator request: a backfill ("run pipeline P over the
scans of last March that were missed / failed / all of them") or a reprocessing ("re-run what
is stale"). Its identity is its kind and its parameters: running the same command again finds
the same row (``campaign_find_or_create``) and resumes it. Every run it creates carries
``run.campaign``, and the workflow manager admits at most ``campaign.max_active`` of them into
the workflow at once (``campaign_admissible_runs``, used by ``runs.run_claim_batch``), so the
throttle holds after the command has exited: the command only plans and creates PENDING runs.

Planning (``campaign_plan``) reads only; ``campaign_advance`` creates what the plan says, each
run in its own savepoint, refreshes the progress counts and finishes the campaign when nothing
is left. The command advances once; the campaign manager (``campaign_manager_tick``,
MANAGERS["campaign"]) advances every active campaign at each tick, which creates the runs of
downstream steps once their upstream runs completed.

**No duplicates.** A campaign creates at most one run per (step, sub-group): a sub-group with a
run created since the campaign began (by this campaign, an earlier interrupted invocation of
it, or the trigger manager) is done. The database's one-active-run-per-sub-group constraint
settles a race with the trigger manager. So an interrupted backfill run again creates only the
runs it had not created yet.

**Backfill** (``kind=backfill``, runs ``triggered_by=backfill``): the sub-groups of a pipeline's
steps (or one step) that hold at least one package whose scan started in ``[since, until)``.
As with the trigger manager, a run takes every package of its sub-group (a combined product is
made from all of its data), and downstream steps take the products of the completed upstream
runs. Modes: ``missing`` re-runs sub-groups with packages no run has covered (the trigger
manager's gap, without cooldown or trigger type); ``failed`` those whose latest run failed for
good; ``all`` every sub-group. A downstream sub-group whose upstream runs are in progress, or
planned by this campaign, waits and is planned at a later advance.

**Reprocess** (``kind=reprocess``, runs ``triggered_by=reprocess``): every completed run with
live stale products (``products.stale_run_reasons``), optionally of one pipeline or step. The
new run (``run.replaces`` = the old one) takes exactly the old run's raw packages (so only
those are staged; the workflow manager reuses a live staging job covering them) and its
upstream products, each replaced by the products of its own replacement where the upstream run
was stale: a stale downstream run waits until its upstream replacement completed. A run whose
stale upstream lies outside the filter is not re-run (it would be stale again at once): the
plan names it. New outputs go to new attempt directories (a new run id); when a replacement
completes, the old products are marked superseded (``products.products_supersede``), never
deleted, and keep their lineage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.utils import timezone

from pipelines.faults import pause_point
from pipelines.models import (
    ACTIVE_RUN_STATUSES,
    Campaign,
    CampaignKind,
    CampaignState,
    DataProduct,
    ExecutedReductionStep,
    Pipeline,
    ReductionStep,
    RunStatus,
)

from .states import TransitionConflict, record_creation, transition

log = logging.getLogger(__name__)

MODES = ("missing", "failed", "all")
# Statuses of a run the workflow manager has admitted (claimed) and not yet finished: what
# max_active bounds. A FAILED run awaiting its retry leaves the workflow and competes again.
ADMITTED_STATUSES = (
    RunStatus.STAGING_DATA,
    RunStatus.SUBMITTED,
    RunStatus.RUNNING,
    RunStatus.COLLECTING_RESULTS,
)
# The campaign manager refreshes product staleness at most this often (the safety net behind
# the hooks in pipelines.receivers).
STALENESS_REFRESH_SECONDS = 300
STALENESS_KEY = "workflow:staleness-refreshed"

RunInputs = ExecutedReductionStep.input_raw_packages.through
RunProducts = ExecutedReductionStep.input_products.through


class CampaignError(ValueError):
    """A campaign that cannot be planned as asked (unknown pipeline or step, bad range or
    mode, disabled pipeline); nothing was changed. Commands answer it with CommandError."""


# --- parameters and identity --------------------------------------------------------------------
def _parse_when(value: str | datetime, what: str) -> datetime:
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(value)
        except (TypeError, ValueError):
            raise CampaignError(
                f"{what} {value!r} is not an ISO date or time (e.g. 2026-03-01 or "
                "2026-03-01T12:00:00+00:00)"
            ) from None
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment, timezone.get_current_timezone())
    return moment


def _pipeline_and_step(pipeline: str | None, step: str | None) -> tuple[Pipeline, str | None]:
    """``pipeline`` by name, or ``step`` as ``PIPELINE/STEP``; CampaignError naming what was
    not found."""
    if bool(pipeline) == bool(step):
        raise CampaignError("name a pipeline (--pipeline NAME) or a step (--step PIPELINE/STEP)")
    step_name = None
    if step:
        pipeline, slash, step_name = step.rpartition("/")
        if not slash or not pipeline or not step_name:
            raise CampaignError(f"--step {step!r}: write PIPELINE/STEP")
    found = Pipeline.objects.filter(name=pipeline).first()
    if found is None:
        known = ", ".join(Pipeline.objects.order_by("name").values_list("name", flat=True)[:20])
        raise CampaignError(f"no pipeline named {pipeline!r}; known: {known or 'none'}")
    if step_name and not ReductionStep.objects.filter(pipeline=found, name=step_name).exists():
        known = ", ".join(found.steps.order_by("step_order").values_list("name", flat=True))
        raise CampaignError(f"pipeline {found.name} has no step {step_name!r}; known: {known}")
    return found, step_name


def backfill_parameters(
    *,
    pipeline: str | None = None,
    step: str | None = None,
    since: str | datetime,
    until: str | datetime,
    mode: str,
) -> dict[str, Any]:
    """The canonical parameters of a backfill (what identifies it), or CampaignError."""
    found, step_name = _pipeline_and_step(pipeline, step)
    if mode not in MODES:
        raise CampaignError(f"mode {mode!r}: one of {', '.join(MODES)}")
    start, end = _parse_when(since, "--since"), _parse_when(until, "--until")
    if start >= end:
        raise CampaignError(f"--since {start.isoformat()} is not before --until {end.isoformat()}")
    if not found.enabled:
        raise CampaignError(f"pipeline {found.name} is disabled; enable it to backfill it")
    return {
        "pipeline_id": found.pk,
        "pipeline": found.name,
        "step": step_name,
        "since": start.isoformat(),
        "until": end.isoformat(),
        "mode": mode,
    }


def reprocess_parameters(*, pipeline: str | None = None, step: str | None = None) -> dict:
    """The canonical parameters of a reprocessing (filters; none = everything stale)."""
    params: dict[str, Any] = {"pipeline_id": None, "pipeline": None, "step": None}
    if pipeline or step:
        found, step_name = _pipeline_and_step(pipeline, step)
        params.update(pipeline_id=found.pk, pipeline=found.name, step=step_name)
    return params


def parameters_key(kind: str, parameters: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps([kind, parameters], sort_keys=True, default=str).encode()
    ).hexdigest()


def campaign_find(kind: str, parameters: dict[str, Any]) -> Campaign | None:
    """The live (active or finished) campaign of these parameters, if any."""
    return Campaign.objects.filter(
        kind=kind,
        parameters_key=parameters_key(kind, parameters),
        state__in=(CampaignState.ACTIVE, CampaignState.FINISHED),
    ).first()


def campaign_find_or_create(
    kind: str,
    parameters: dict[str, Any],
    *,
    max_active: int | None,
    reason: str = "",
    user: Any = None,
    requested_by: str = "",
) -> tuple[Campaign, bool]:
    """The live campaign of ``kind`` + ``parameters`` (resumed: ``max_active`` and ``reason``
    updated when given), or a new ACTIVE one. Two invocations at once get the same row (the
    unique constraint; the loser reads the winner's). Returns (campaign, created)."""
    key = parameters_key(kind, parameters)
    existing = campaign_find(kind, parameters)
    if existing is None:
        try:
            with transaction.atomic():
                campaign = Campaign.objects.create(
                    kind=kind,
                    parameters=parameters,
                    parameters_key=key,
                    max_active=max_active or 10,
                    reason=reason,
                    created_by=user if getattr(user, "pk", None) else None,
                    requested_by=requested_by[:200],
                )
                record_creation(
                    campaign, actor=requested_by or "campaigns", reason=reason, field="state"
                )
            return campaign, True
        except IntegrityError:
            existing = campaign_find(kind, parameters)
            if existing is None:
                raise
    changes: dict[str, Any] = {}
    if max_active and max_active != existing.max_active:
        changes["max_active"] = max_active
    if reason and reason != existing.reason:
        changes["reason"] = reason
    if changes:
        Campaign.objects.filter(pk=existing.pk).update(**changes, updated_at=timezone.now())
        for name, value in changes.items():
            setattr(existing, name, value)
    return existing, False


# --- planning -----------------------------------------------------------------------------------
@dataclass
class PlannedRun:
    """A run a campaign creates: its (step, sub-group), inputs and why."""

    step: ReductionStep
    key: str
    values: dict[str, Any]
    package_ids: list[int]
    why: str
    upstream_run_ids: list[int] = field(default_factory=list)  # their products are inputs
    product_ids: list[int] | None = None  # explicit input products (reprocess)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    replaces: ExecutedReductionStep | None = None


@dataclass
class CampaignPlan:
    """What a campaign would do now: ``runs`` to create, sub-groups ``waiting`` for upstream
    runs or an occupied sub-group (planned at a later advance), and ``skipped`` ones counted
    by reason ("done", "covered", "not failed", "upstream stale outside the filter", ...)."""

    runs: list[PlannedRun] = field(default_factory=list)
    waiting: list[tuple[ReductionStep, str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def campaign_plan(
    kind: str, parameters: dict[str, Any], *, campaign: Campaign | None = None
) -> CampaignPlan:
    """What ``campaign`` (or, for a dry run, a campaign of these parameters not created yet)
    would create now. Reads only."""
    if kind == CampaignKind.BACKFILL:
        return _plan_backfill(parameters, campaign)
    if kind == CampaignKind.REPROCESS:
        return _plan_reprocess(parameters, campaign)
    raise CampaignError(f"unknown campaign kind {kind!r}")


def _done_keys(step: ReductionStep, campaign: Campaign | None) -> set[str]:
    """Sub-groups of ``step`` with a run created since the campaign began (or of it)."""
    if campaign is None:
        return set()
    return set(
        ExecutedReductionStep.objects.filter(reduction_step=step)
        .filter(Q(campaign=campaign) | Q(created_at__gte=campaign.created_at))
        .values_list("sub_group_key", flat=True)
        .distinct()
    )


def _latest_failed_keys(step: ReductionStep) -> set[str]:
    """Sub-groups of ``step`` whose latest run failed for good."""
    latest: dict[str, tuple[str, bool]] = {}
    for key, status, for_good in (
        ExecutedReductionStep.objects.filter(reduction_step=step)
        .order_by("sub_group_key", "-created_at", "-pk")
        .values_list("sub_group_key", "status", "failed_for_good")
    ):
        latest.setdefault(key, (status, for_good))
    return {
        k for k, (status, for_good) in latest.items() if status == RunStatus.FAILED and for_good
    }


def _plan_backfill(parameters: dict[str, Any], campaign: Campaign | None) -> CampaignPlan:
    from pipelines.grouping import package_sub_groups
    from pipelines.services.triggers.gap import (
        Reason,
        decide,
        ordered_steps,
        pipeline_packages,
    )

    pipeline = Pipeline.objects.filter(pk=parameters["pipeline_id"]).first()
    if pipeline is None:
        raise CampaignError(f"pipeline {parameters.get('pipeline')!r} no longer exists")
    since = _parse_when(parameters["since"], "since")
    until = _parse_when(parameters["until"], "until")
    mode = parameters["mode"]
    packages = pipeline_packages(pipeline)
    in_range = packages.filter(
        executed_obs_unit__start_time__gte=since, executed_obs_unit__start_time__lt=until
    )
    in_range_ids = set(in_range.values_list("pk", flat=True))
    plan = CampaignPlan()
    now = timezone.now()
    groups_by: dict[tuple[str, ...], tuple[dict, set[str]]] = {}
    planned_packages: dict[int, set[int]] = defaultdict(set)
    for step, upstream in ordered_steps(pipeline):
        if parameters.get("step") and step.name != parameters["step"]:
            continue
        group_by = tuple(step.group_by or [])
        if group_by not in groups_by:
            # Keying packages into sub-groups is the costly part of planning (Python per
            # package), so it is done once over the pipeline's packages; the range only picks
            # which of those sub-groups are touched.
            everything = package_sub_groups(packages, list(group_by))
            touched = {
                k for k, g in everything.items() if not in_range_ids.isdisjoint(g.package_ids)
            }
            groups_by[group_by] = (everything, touched)
        everything, touched = groups_by[group_by]
        sub_groups = {k: everything[k] for k in sorted(touched) if k in everything}
        if not sub_groups:
            continue
        done = _done_keys(step, campaign)
        failed = _latest_failed_keys(step) if mode == "failed" else set()
        for decision in decide(
            step, upstream, sub_groups, now=now, full=True, respect_cooldown=False
        ):
            key = decision.key
            if key in done:
                plan.skipped["done"] += 1
                continue
            # Every package of the sub-group, not only the eligible ones: a package whose
            # upstream run this plan creates must be waited for, not left out.
            members = set(sub_groups[key].package_ids)
            waiting_for = [u.name for u in upstream if planned_packages[u.pk] & members]
            if waiting_for:
                plan.waiting.append((step, key, f"upstream {', '.join(waiting_for)} planned"))
                continue
            if decision.reason == Reason.OCCUPIED:
                plan.waiting.append((step, key, f"run {decision.run_id} occupies it"))
                continue
            if decision.reason == Reason.WAITING_UPSTREAM:
                plan.waiting.append((step, key, f"upstream run {decision.run_id} in progress"))
                continue
            if decision.reason not in (Reason.CREATE, Reason.GAP_EMPTY, Reason.COOLDOWN):
                plan.skipped[str(decision.reason).replace("_", " ")] += 1
                continue
            if mode == "missing" and not decision.gap:
                plan.skipped["covered"] += 1
                continue
            if mode == "failed" and key not in failed:
                plan.skipped["not failed"] += 1
                continue
            why = {
                "missing": f"{len(decision.gap)} package(s) not processed",
                "failed": f"latest run {decision.run_id or ''} failed for good".replace("  ", " "),
                "all": "re-run",
            }[mode]
            plan.runs.append(
                PlannedRun(
                    step=step,
                    key=key,
                    values=decision.values,
                    package_ids=decision.package_ids,
                    why=why,
                    upstream_run_ids=decision.upstream_run_ids,
                    excluded=decision.excluded,
                )
            )
            planned_packages[step.pk].update(decision.package_ids)
    return plan


def _plan_reprocess(parameters: dict[str, Any], campaign: Campaign | None) -> CampaignPlan:
    from pipelines.services.products import stale_run_reasons

    plan = CampaignPlan()
    reasons = stale_run_reasons()
    stale = (
        ExecutedReductionStep.objects.filter(
            pk__in=list(reasons), status=RunStatus.COMPLETED, products__superseded_at__isnull=True
        )
        .distinct()
        .select_related("reduction_step__pipeline", "reduction_step__software")
    )
    in_scope = stale
    if parameters.get("pipeline_id"):
        in_scope = in_scope.filter(reduction_step__pipeline_id=parameters["pipeline_id"])
    if parameters.get("step"):
        in_scope = in_scope.filter(reduction_step__name=parameters["step"])
    scope = {run.pk: run for run in in_scope}
    # Replacements of every stale run (and of runs upstream of them): newest first per run.
    replacement: dict[int, ExecutedReductionStep] = {}
    for new in ExecutedReductionStep.objects.filter(replaces__isnull=False).order_by(
        "-created_at", "-pk"
    ):
        assert new.replaces_id is not None
        replacement.setdefault(new.replaces_id, new)
    mine: set[int] = set()
    if campaign is not None:
        mine = set(
            campaign.runs.filter(replaces__isnull=False).values_list("replaces_id", flat=True)
        )
    # Inputs: the products each in-scope run consumed, with their producers.
    consumed: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for run_id, product_id, producer in RunProducts.objects.filter(
        executedreductionstep_id__in=list(scope)
    ).values_list("executedreductionstep_id", "dataproduct_id", "dataproduct__produced_by_id"):
        consumed[run_id].append((product_id, producer))
    packages: dict[int, list[int]] = defaultdict(list)
    for run_id, package_id in RunInputs.objects.filter(
        executedreductionstep_id__in=list(scope)
    ).values_list("executedreductionstep_id", "rawdatapackage_id"):
        packages[run_id].append(package_id)
    occupied = set(
        ExecutedReductionStep.objects.filter(
            Q(status__in=ACTIVE_RUN_STATUSES) | Q(status=RunStatus.FAILED, failed_for_good=False),
            reduction_step_id__in={r.reduction_step_id for r in scope.values()},
        ).values_list("reduction_step_id", "sub_group_key")
    )
    products_of: dict[int, list[int]] = defaultdict(list)
    completed_replacements = [r.pk for r in replacement.values() if r.status == RunStatus.COMPLETED]
    for product_id, producer in DataProduct.objects.filter(
        produced_by_id__in=completed_replacements
    ).values_list("pk", "produced_by_id"):
        products_of[producer].append(product_id)
    planned: set[int] = set()
    # Upstream runs before their consumers: by step order within a pipeline, then id.
    for run in sorted(scope.values(), key=lambda r: (r.reduction_step.step_order, r.pk)):
        step = run.reduction_step
        current = replacement.get(run.pk)
        if run.pk in mine or (
            current is not None
            and not (
                current.status == RunStatus.CANCELLED
                or (current.status == RunStatus.FAILED and current.failed_for_good)
            )
        ):
            plan.skipped["done"] += 1
            continue
        inputs: list[int] = []
        wait = blocked = ""
        for product_id, producer in consumed.get(run.pk, []):
            if producer not in reasons:
                inputs.append(product_id)
                continue
            upstream_new = replacement.get(producer)
            if upstream_new is not None and upstream_new.status == RunStatus.COMPLETED:
                inputs.extend(products_of[upstream_new.pk])
            elif producer in planned or (
                upstream_new is not None and upstream_new.status in ACTIVE_RUN_STATUSES
            ):
                wait = f"upstream run {producer} is being reprocessed"
            elif producer in scope:
                wait = f"upstream run {producer} is reprocessed first"
            else:
                blocked = "upstream stale outside the filter"
        if blocked:
            plan.skipped[blocked] += 1
            continue
        if wait:
            plan.waiting.append((step, run.sub_group_key, wait))
            continue
        if (step.pk, run.sub_group_key) in occupied:
            plan.waiting.append((step, run.sub_group_key, "another run occupies it"))
            continue
        plan.runs.append(
            PlannedRun(
                step=step,
                key=run.sub_group_key,
                values=run.sub_group_values,
                package_ids=sorted(packages.get(run.pk, [])),
                why=f"replaces run {run.pk}: {reasons[run.pk]}",
                product_ids=sorted(set(inputs)),
                excluded=run.excluded_inputs,
                replaces=run,
            )
        )
        planned.add(run.pk)
    return plan


# --- creating runs and advancing ----------------------------------------------------------------
def campaign_create_run(
    planned: PlannedRun, *, campaign: Campaign, actor: str
) -> ExecutedReductionStep | None:
    """Insert the PENDING run of ``planned`` in ``campaign``, with its inputs, in a savepoint.
    Returns None when the database refused it (another run took the sub-group meanwhile)."""
    from pipelines.services.triggers.creation import insert_run

    step = planned.step
    triggered_by = (
        ExecutedReductionStep.TriggeredBy.REPROCESS
        if campaign.kind == CampaignKind.REPROCESS
        else ExecutedReductionStep.TriggeredBy.BACKFILL
    )
    try:
        with transaction.atomic():
            run = insert_run(
                step,
                key=planned.key,
                values=planned.values,
                package_ids=planned.package_ids,
                excluded=planned.excluded,
                upstream_run_ids=planned.upstream_run_ids,
                product_ids=planned.product_ids,
                triggered_by=triggered_by,
                actor=actor,
                reason=f"{campaign}: {planned.why}",
                campaign=campaign,
                replaces=planned.replaces,
            )
    except IntegrityError as exc:
        log.info("%s: %s [%s] not created, occupied: %s", campaign, step, planned.key, exc)
        return None
    return run


@dataclass
class AdvanceResult:
    created: int = 0
    refused: int = 0
    waiting: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    superseded: int = 0
    finished: bool = False


def campaign_advance(
    campaign: Campaign,
    *,
    actor: str = "campaign-manager",
    on_created: Callable[[ExecutedReductionStep], None] | None = None,
    plan: CampaignPlan | None = None,
) -> AdvanceResult:
    """Create the runs the campaign's plan says are due (``plan`` when the caller has it),
    mark the products its completed replacement runs supersede, refresh its progress counts,
    and finish it when nothing is left (no run to create, none waiting, none of its runs still
    active). A finished campaign that finds new work is reopened. A cancelled one does
    nothing. ``on_created`` is called after each run (the command's progress bar). Safe to run
    twice and concurrently: see the module docstring."""
    from pipelines.services.products import products_supersede

    result = AdvanceResult()
    campaign.refresh_from_db()
    if campaign.state == CampaignState.CANCELLED:
        return result
    if plan is None:
        plan = campaign_plan(campaign.kind, campaign.parameters, campaign=campaign)
    if plan.runs and campaign.state == CampaignState.FINISHED:
        transition(
            campaign,
            CampaignState.ACTIVE,
            field="state",
            actor=actor,
            reason=f"resumed: {len(plan.runs)} more run(s) to create",
            updates={"finished_at": None},
        )
    for planned in plan.runs:
        run = campaign_create_run(planned, campaign=campaign, actor=actor)
        if run is None:
            result.refused += 1
            continue
        result.created += 1
        if on_created is not None:
            on_created(run)
        pause_point("campaign.after_run_created")
    result.waiting = len(plan.waiting) + result.refused
    result.skipped = dict(plan.skipped)
    for run in campaign.runs.filter(
        status=RunStatus.COMPLETED,
        replaces__products__superseded_at__isnull=True,
    ).distinct():
        result.superseded += products_supersede(run)
    counts = campaign_refresh_progress(campaign, waiting=result.waiting)
    if (
        campaign.state == CampaignState.ACTIVE
        and not result.created
        and not result.waiting
        and not counts["active"]
    ):
        try:
            transition(
                campaign,
                CampaignState.FINISHED,
                field="state",
                actor=actor,
                reason=(
                    f"{counts['created']} run(s): {counts['completed']} completed, "
                    f"{counts['failed']} failed, {counts['cancelled']} cancelled"
                ),
                updates={"finished_at": timezone.now()},
            )
            result.finished = True
        except TransitionConflict:
            pass  # another advance finished (or cancelled) it first
    return result


def campaign_refresh_progress(campaign: Campaign, *, waiting: int | None = None) -> dict[str, int]:
    """Recount the campaign's runs by outcome (one aggregate query) into its progress fields.
    ``active`` counts runs not finished yet, a FAILED run awaiting its retry included."""
    counts = campaign.runs.aggregate(
        created=Count("pk"),
        active=Count(
            "pk",
            filter=Q(status__in=ACTIVE_RUN_STATUSES)
            | Q(status=RunStatus.FAILED, failed_for_good=False),
        ),
        completed=Count("pk", filter=Q(status=RunStatus.COMPLETED)),
        failed=Count("pk", filter=Q(status=RunStatus.FAILED, failed_for_good=True)),
        cancelled=Count("pk", filter=Q(status=RunStatus.CANCELLED)),
    )
    values: dict[str, Any] = {
        "runs_created": counts["created"],
        "runs_active": counts["active"],
        "runs_completed": counts["completed"],
        "runs_failed": counts["failed"],
        "runs_cancelled": counts["cancelled"],
    }
    if waiting is not None:
        values["waiting"] = waiting
    Campaign.objects.filter(pk=campaign.pk).update(**values, updated_at=timezone.now())
    for name, value in values.items():
        setattr(campaign, name, value)
    return counts


def campaign_cancel(campaign: Campaign, *, actor: str, reason: str = "") -> Campaign:
    """Stop a campaign: CANCELLED, and its runs not admitted yet (PENDING) cancelled too; runs
    already in the workflow finish. Raises TransitionConflict when it is not active."""
    from .runs import RunConflict, run_cancel

    transition(
        campaign,
        CampaignState.CANCELLED,
        field="state",
        actor=actor,
        reason=reason or "cancelled",
        updates={"finished_at": timezone.now()},
    )
    for run in campaign.runs.filter(status=RunStatus.PENDING):
        try:
            run_cancel(run, actor=actor, reason=f"{campaign} cancelled")
        except RunConflict:
            continue  # admitted meanwhile: it finishes
    campaign_refresh_progress(campaign)
    return campaign


# --- admission (the workflow manager's claim) ---------------------------------------------------
def campaign_admissible_runs() -> Q:
    """The runs the workflow manager may claim as far as campaigns go: runs of no campaign,
    and for each campaign with PENDING runs, its oldest PENDING runs up to ``max_active`` minus
    its runs already admitted (``ADMITTED_STATUSES``). Call it inside the claim's transaction:
    on PostgreSQL it locks those campaigns' rows until the claim commits, so two managers
    claiming at once cannot both fill the same free slots. A few queries: one for the
    campaigns, one for their admitted counts, one per campaign with free slots."""
    campaign_ids = list(
        ExecutedReductionStep.objects.filter(status=RunStatus.PENDING, campaign__isnull=False)
        .values_list("campaign_id", flat=True)
        .distinct()
    )
    if not campaign_ids:
        return Q(campaign__isnull=True)
    limits = dict(
        Campaign.objects.select_for_update()
        .filter(pk__in=campaign_ids)
        .order_by("pk")
        .values_list("pk", "max_active")
    )
    admitted = dict(
        ExecutedReductionStep.objects.filter(
            campaign_id__in=campaign_ids, status__in=ADMITTED_STATUSES
        )
        .values("campaign_id")
        .annotate(n=Count("pk"))
        .values_list("campaign_id", "n")
    )
    ids: list[int] = []
    for campaign_id, limit in limits.items():
        free = limit - admitted.get(campaign_id, 0)
        if free > 0:
            ids += list(
                ExecutedReductionStep.objects.filter(
                    campaign_id=campaign_id, status=RunStatus.PENDING
                )
                .order_by("created_at", "pk")
                .values_list("pk", flat=True)[:free]
            )
    return Q(campaign__isnull=True) | Q(pk__in=ids)


# --- the campaign manager -----------------------------------------------------------------------
def campaign_manager_tick(*, owner: str) -> dict[str, int]:
    """One tick (MANAGERS["campaign"]): advance every active campaign (create the runs now due,
    e.g. downstream steps whose upstream runs completed; supersede replaced products; finish
    campaigns with nothing left), and refresh product staleness at most every
    ``STALENESS_REFRESH_SECONDS``. Returns counts: created, superseded, finished, stale_marked
    (non-zero: work found). A campaign whose advance raises is logged and the others go on."""
    from pipelines.services.products import products_refresh_staleness

    counts = {"created": 0, "superseded": 0, "finished": 0, "stale_marked": 0, "errors": 0}
    try:
        due = cache.add(STALENESS_KEY, "1", timeout=STALENESS_REFRESH_SECONDS)
    except Exception:
        due = True
    if due:
        report = products_refresh_staleness()
        counts["stale_marked"] = report.marked + report.cleared
    actor = f"campaign-manager:{owner}"[:200]
    for campaign in Campaign.objects.filter(state=CampaignState.ACTIVE).order_by("created_at"):
        try:
            result = campaign_advance(campaign, actor=actor)
        except Exception:
            log.exception("campaign manager: advancing %s failed", campaign)
            counts["errors"] += 1
            continue
        counts["created"] += result.created
        counts["superseded"] += result.superseded
        counts["finished"] += int(result.finished)
    return counts
