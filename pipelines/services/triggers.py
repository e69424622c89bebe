"""The trigger manager (workflow manager §4.2): find the gaps of every step and create PENDING runs.

Semantics (the brief's PROPOSED ones, made exact here; ``explain_step`` answers in these words):

- **Which data.** A pipeline's packages are its grouping's (``grouping_queryset``). When the
  grouping's rules say nothing about ``RawDataPackage.state``, only ARCHIVED packages count (data
  that is not in an archive yet cannot be staged); rules that name ``state`` decide themselves.
- **Sub-groups.** Each step splits those packages by its own ``group_by``
  (``package_sub_groups``); a run belongs to one (step, ``sub_group_key``).
- **Gap.** The packages of a sub-group that are not an input of any run of that (step,
  sub-group), whatever the run's state: COMPLETED, active, CANCELLED, FAILED for good and
  FAILED awaiting its retry all cover their inputs. So only new packages reopen a sub-group (a
  cancelled run is not re-created at the next tick), and a new run then takes ALL current
  packages of the sub-group (a combined product must be made from everything).
- **Occupied.** No run is created while the (step, sub-group) has an active run or a FAILED one
  awaiting its retry; the database refuses it anyway (``executed_reduction_step_one_active_per_
  subgroup``): each run is inserted in its own savepoint and a constraint loser is skipped, so an
  ``IntegrityError`` never leaves a tick.
- **Cooldown.** A new run needs ``now - created_at`` of the last run of the (step, sub-group) to
  be at least ``cooldown_seconds`` (reading (a) of the brief: runs are at least N seconds apart).
- **Upstream.** For a step with ``depends_on``, a package is *eligible* when, for every upstream
  step, the latest run that took it as input COMPLETED; the products of those runs become the new
  run's ``input_products``. A package whose latest upstream run failed for good or was cancelled
  is *excluded*: left out and listed in ``run.excluded_inputs`` (the manifest repeats it). A
  package whose upstream run is still in progress (or FAILED awaiting a retry) makes the whole
  sub-group *wait*, so a combined step runs once over all of its scans instead of once per
  finished scan; a package with no upstream run yet does not block (it reopens the sub-group
  when its upstream run completes). The gap of a downstream step is its eligible packages not
  yet covered. The price: a fan-in step whose upstream always has a run in progress (data
  arriving faster than it is reduced) waits until the upstream is quiet; ``explain_step``
  names the run it waits for.
- **Trigger types gate root steps only** (steps without ``depends_on``): CONTINUOUS at every
  evaluation, CRON only once per due time of ``trigger_config["cron"]`` (croniter;
  ``Pipeline.cron_last_due_at`` is advanced by a conditional UPDATE, so of several managers
  exactly one evaluates each due time), MANUAL only through ``pipeline_trigger``. Downstream
  steps follow their completed upstream runs in every mode, so a triggered DAG runs to its end.
- **Where and whether.** Only enabled pipelines of this instance's processing location
  (``processing_location_id()``) are evaluated, by descending priority.
- **Incremental.** A tick looks at packages archived after ``Pipeline.trigger_watermark``, at
  upstream runs completed since it and at sub-groups whose cooldown ended since it; every
  ``WORKFLOW_TRIGGER_FULL_INTERVAL`` seconds a pipeline is re-evaluated in full (the safety net
  for anything the increments cannot see, e.g. a package archived by a transaction that
  committed long after it stamped ``archived_at``, or rules over other columns that changed).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from pipelines.models import (
    ACTIVE_RUN_STATUSES,
    DataLocation,
    DataProduct,
    ExecutedReductionStep,
    PackageState,
    Pipeline,
    RawDataPackage,
    ReductionSoftwareVersion,
    ReductionStep,
    RunStatus,
    TriggerType,
    VersionPolicy,
)

from .states import record_creation

if TYPE_CHECKING:
    from pipelines.grouping import SubGroup

log = logging.getLogger(__name__)

# Packages archived this long before a tick are looked at again by the next one: the archiving
# transaction stamps ``archived_at`` before it commits, so a package can become visible after a
# tick that already read past its timestamp. Re-reading them is harmless (they are covered).
WATERMARK_LAG = timedelta(seconds=60)
# The cache key that says an on-demand evaluation is queued and has not started yet.
QUEUED_KEY = "workflow:trigger-evaluation-queued"

RunInputs = ExecutedReductionStep.input_raw_packages.through
RunProducts = ExecutedReductionStep.input_products.through


class TriggerError(ValidationError):
    """A manual trigger that cannot be done (disabled pipeline, unknown sub-group): nothing was
    created."""


# --- where this instance works ------------------------------------------------------------------
def processing_location_id() -> int | None:
    """The PROCESSING location whose pipelines this instance serves.

    ``settings.PROCESSING_LOCATION_ID`` (env ``PROCESSING_LOCATION_ID``) when set; it must name a
    PROCESSING location, else ``ImproperlyConfigured`` (a typo must not silently serve nothing).
    Unset: the single PROCESSING location in the database; with several and none configured,
    ``None``, meaning "every PROCESSING location": the embedded laptop facility (one process,
    ``manage.py facility run``) runs everything, and a deployment with one instance per
    processing location sets the variable on each. The trigger, workflow and result managers
    all ask this function.
    """
    configured = getattr(settings, "PROCESSING_LOCATION_ID", None)
    processing = DataLocation.objects.filter(location_type=DataLocation.LocationType.PROCESSING)
    if configured:
        if not processing.filter(pk=configured).exists():
            known = ", ".join(
                f"{pk} ({site}:{name})"
                for pk, site, name in processing.values_list("pk", "site__short_name", "name")
            )
            raise ImproperlyConfigured(
                f"PROCESSING_LOCATION_ID={configured} is not a PROCESSING location; "
                f"known: {known or 'none'}"
            )
        return int(configured)
    ids = list(processing.values_list("pk", flat=True)[:2])
    return ids[0] if len(ids) == 1 else None


def served_pipelines() -> QuerySet[Pipeline]:
    """Enabled pipelines of this instance's processing location, highest priority first."""
    pipelines = Pipeline.objects.filter(enabled=True).select_related("data_grouping")
    location = processing_location_id()
    if location is not None:
        pipelines = pipelines.filter(processing_location_id=location)
    return pipelines.order_by("-priority", "name")


def pipeline_packages(pipeline: Pipeline) -> QuerySet[RawDataPackage]:
    """The pipeline's packages: its grouping's, ARCHIVED only unless a rule names the state."""
    from pipelines.grouping import grouping_queryset

    queryset = grouping_queryset(pipeline.data_grouping)
    if not _rules_mention_state(pipeline.data_grouping.filter_rules):
        queryset = queryset.filter(state=PackageState.ARCHIVED)
    return queryset


def _rules_mention_state(rules: Any) -> bool:
    for rule in rules or []:
        if not isinstance(rule, dict):
            continue
        table = re.sub(r"[^a-z]", "", str(rule.get("table", "")).lower())
        if table == "rawdatapackage" and str(rule.get("column", "")).lower() == "state":
            return True
    return False


# --- what the runs of a step already cover ------------------------------------------------------
@dataclass
class RunInfo:
    id: int
    status: str
    failed_for_good: bool
    created_at: datetime
    packages: set[int] = field(default_factory=set)

    @property
    def occupying(self) -> bool:
        """Holds its (step, sub-group): active, or FAILED awaiting its retry (the constraint)."""
        return self.status in ACTIVE_RUN_STATUSES or (
            self.status == RunStatus.FAILED and not self.failed_for_good
        )

    @property
    def left_out(self) -> bool:
        """Its data goes no further: cancelled or failed for good."""
        return self.status == RunStatus.CANCELLED or (
            self.status == RunStatus.FAILED and self.failed_for_good
        )


def _runs_by_key(step: ReductionStep, keys: Iterable[str] | None) -> dict[str, list[RunInfo]]:
    """Runs of ``step`` (of ``keys``, or all), newest first, with their input packages. One
    query (runs LEFT JOIN their inputs)."""
    runs = ExecutedReductionStep.objects.filter(reduction_step=step)
    if keys is not None:
        runs = runs.filter(sub_group_key__in=list(keys))
    by_id: dict[int, RunInfo] = {}
    by_key: dict[str, list[RunInfo]] = defaultdict(list)
    for pk, key, status, failed_for_good, created_at, package_id in runs.order_by(
        "-created_at", "-pk"
    ).values_list(
        "pk", "sub_group_key", "status", "failed_for_good", "created_at", "input_raw_packages"
    ):
        info = by_id.get(pk)
        if info is None:
            info = by_id[pk] = RunInfo(pk, status, failed_for_good, created_at)
            by_key[key].append(info)
        if package_id is not None:
            info.packages.add(package_id)
    return by_key


def _upstream_runs(
    upstream: ReductionStep, package_ids: set[int] | None
) -> tuple[dict[int, RunInfo], dict[int, int]]:
    """For each package, the latest run of ``upstream`` that took it as input:
    ({run id: RunInfo}, {package id: run id}). One query (all of the step's runs when
    ``package_ids`` is None or large, which is cheaper than a huge IN list)."""
    links = RunInputs.objects.filter(executedreductionstep__reduction_step=upstream)
    if package_ids is not None and len(package_ids) <= 5000:
        links = links.filter(rawdatapackage_id__in=list(package_ids))
    runs: dict[int, RunInfo] = {}
    latest: dict[int, int] = {}
    for package_id, run_id, status, failed_for_good, created_at in links.values_list(
        "rawdatapackage_id",
        "executedreductionstep_id",
        "executedreductionstep__status",
        "executedreductionstep__failed_for_good",
        "executedreductionstep__created_at",
    ):
        runs.setdefault(run_id, RunInfo(run_id, status, failed_for_good, created_at))
        current = latest.get(package_id)
        if current is None or (created_at, run_id) > (runs[current].created_at, current):
            latest[package_id] = run_id
    return runs, latest


# --- decisions ----------------------------------------------------------------------------------
class Reason:
    """What an evaluation found for one (step, sub-group); ``explain_step`` words them."""

    CREATE = "create"
    NO_DATA = "no_data"
    GAP_EMPTY = "gap_empty"
    OCCUPIED = "occupied"
    COOLDOWN = "cooldown"
    WAITING_UPSTREAM = "waiting_upstream"
    NO_UPSTREAM_DATA = "no_upstream_data"
    UPSTREAM_LEFT_OUT = "upstream_left_out"


@dataclass
class Decision:
    """The outcome for one (step, sub-group). ``package_ids`` are the inputs a run would take
    (all eligible packages of the sub-group), ``gap`` the uncovered ones among them."""

    step: ReductionStep
    key: str
    values: dict[str, Any]
    reason: str
    package_ids: list[int] = field(default_factory=list)
    gap: list[int] = field(default_factory=list)
    upstream_run_ids: list[int] = field(default_factory=list)  # COMPLETED runs feeding it
    excluded: list[dict[str, Any]] = field(default_factory=list)
    run_id: int | None = None  # the occupying / last / upstream run the reason refers to
    until: datetime | None = None  # end of the cooldown
    run: ExecutedReductionStep | None = None  # the run created for it, if any


def _decide(
    step: ReductionStep,
    upstream: Sequence[ReductionStep],
    sub_groups: dict[str, SubGroup],
    *,
    now: datetime,
    full: bool,
    respect_cooldown: bool = True,
) -> list[Decision]:
    """Decide every sub-group of ``step`` without writing anything. ``full`` loads all of the
    step's runs (one query each) instead of those of the given sub-groups."""
    runs_by_key = _runs_by_key(step, None if full else sub_groups.keys())
    eligible_of: dict[str, list[int]] = {}
    excluded_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    waiting_of: dict[str, int] = {}
    upstream_runs_of: dict[str, set[int]] = defaultdict(set)
    if upstream:
        wanted: set[int] | None = None
        if not full:
            wanted = {p for group in sub_groups.values() for p in group.package_ids}
        states = [(u, *_upstream_runs(u, wanted)) for u in upstream]
        names = _package_names(sub_groups, states)
        for key, group in sub_groups.items():
            eligible: list[int] = []
            for package_id in group.package_ids:
                verdict = "ok"
                for u, u_runs, latest in states:
                    run_id = latest.get(package_id)
                    if run_id is None:
                        verdict = "none" if verdict == "ok" else verdict
                        continue
                    info = u_runs[run_id]
                    if info.left_out:
                        verdict = "left_out"
                        excluded_of[key].append(
                            {
                                "package": package_id,
                                "name": names.get(package_id, ""),
                                "reason": f"upstream run {run_id} of step {u.name} "
                                + (
                                    "was cancelled"
                                    if info.status == RunStatus.CANCELLED
                                    else "failed for good"
                                ),
                            }
                        )
                        break
                    if info.status != RunStatus.COMPLETED:
                        waiting_of.setdefault(key, run_id)
                        verdict = "waiting" if verdict == "ok" else verdict
                    else:
                        upstream_runs_of[key].add(run_id)
                if verdict == "ok":
                    eligible.append(package_id)
            eligible_of[key] = eligible
    decisions = []
    for key, group in sub_groups.items():
        members = eligible_of[key] if upstream else list(group.package_ids)
        runs = runs_by_key.get(key, [])
        covered = set().union(*(r.packages for r in runs)) if runs else set()
        gap = [p for p in members if p not in covered]
        decision = Decision(
            step=step,
            key=key,
            values=dict(group.values),
            reason=Reason.CREATE,
            package_ids=sorted(members),
            gap=sorted(gap),
            upstream_run_ids=sorted(upstream_runs_of.get(key, ())),
            excluded=excluded_of.get(key, []),
        )
        occupying = next((r for r in runs if r.occupying), None)
        if not group.package_ids:
            decision.reason = Reason.NO_DATA
        elif occupying is not None:
            decision.reason, decision.run_id = Reason.OCCUPIED, occupying.id
        elif key in waiting_of:
            decision.reason, decision.run_id = Reason.WAITING_UPSTREAM, waiting_of[key]
        elif upstream and not members:
            decision.reason = (
                Reason.UPSTREAM_LEFT_OUT if excluded_of.get(key) else Reason.NO_UPSTREAM_DATA
            )
        elif not gap:
            decision.reason = Reason.GAP_EMPTY
            decision.run_id = runs[0].id if runs else None
        elif respect_cooldown and runs:
            until = runs[0].created_at + timedelta(seconds=step.cooldown_seconds)
            if now < until:
                decision.reason, decision.run_id, decision.until = (
                    Reason.COOLDOWN,
                    runs[0].id,
                    until,
                )
        decisions.append(decision)
    return decisions


def _package_names(
    sub_groups: dict[str, SubGroup], states: list[tuple[ReductionStep, dict, dict]]
) -> dict[int, str]:
    """Names of the packages some upstream run left out (for ``excluded_inputs``)."""
    left_out: set[int] = set()
    for _u, runs, latest in states:
        left_out.update(p for p, r in latest.items() if runs[r].left_out)
    members = {p for g in sub_groups.values() for p in g.package_ids}
    ids = left_out & members
    if not ids:
        return {}
    return dict(RawDataPackage.objects.filter(pk__in=ids).values_list("pk", "name"))


# --- creating runs ------------------------------------------------------------------------------
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


def _config_snapshot(step: ReductionStep) -> dict[str, Any]:
    """What the run will be given, frozen at creation: the step's parameter set (``parameters``,
    read by the manifest), its resources and grouping."""
    config = step.config
    return {
        "config": config.name if config else "",
        "parameters": dict(config.parameters) if config else {},
        "resource_requirements": dict(step.resource_requirements or {}),
        "group_by": list(step.group_by or []),
    }


def _create_run(
    decision: Decision, *, triggered_by: str, actor: str
) -> ExecutedReductionStep | None:
    """Insert the PENDING run of a decision with its inputs, in a savepoint. Returns None when
    the database refused it because another run occupies the (step, sub-group) meanwhile (the
    unique constraint: another manager won the race)."""
    step = decision.step
    try:
        with transaction.atomic():
            run = ExecutedReductionStep.objects.create(
                reduction_step=step,
                sub_group_key=decision.key,
                sub_group_values=decision.values,
                status=RunStatus.PENDING,
                triggered_by=triggered_by,
                max_retries=step.max_retries,
                software_version=step_software_version(step),
                config_snapshot=_config_snapshot(step),
                excluded_inputs=decision.excluded,
            )
            RunInputs.objects.bulk_create(
                [
                    RunInputs(executedreductionstep_id=run.pk, rawdatapackage_id=p)
                    for p in decision.package_ids
                ]
            )
            # The upstream runs' products, read only now that a run is made of them.
            products = DataProduct.objects.filter(
                produced_by_id__in=decision.upstream_run_ids
            ).values_list("pk", flat=True)
            if decision.upstream_run_ids:
                RunProducts.objects.bulk_create(
                    [
                        RunProducts(executedreductionstep_id=run.pk, dataproduct_id=p)
                        for p in products
                    ]
                )
            record_creation(
                run,
                actor=actor,
                reason=f"{len(decision.package_ids)} packages, {len(decision.gap)} new"
                + (f", {len(decision.excluded)} left out" if decision.excluded else ""),
            )
    except IntegrityError as exc:
        log.info("%s [%s]: not created, the sub-group is occupied: %s", step, decision.key, exc)
        return None
    decision.run = run
    return run


# --- evaluating a pipeline ----------------------------------------------------------------------
def _ordered_steps(pipeline: Pipeline) -> list[tuple[ReductionStep, list[ReductionStep]]]:
    """The pipeline's steps with their upstream steps, upstream first."""
    return _steps_of([pipeline])[pipeline.pk]


def _steps_of(
    pipelines: Sequence[Pipeline],
) -> dict[int, list[tuple[ReductionStep, list[ReductionStep]]]]:
    """Each pipeline's steps with their upstream steps, upstream first (topological; ties by
    step_order). A cycle (refused on save) is broken by step_order rather than looping. Two
    queries for all the pipelines."""
    ids = [p.pk for p in pipelines]
    steps = list(
        ReductionStep.objects.filter(pipeline_id__in=ids).select_related(
            "software", "software_version", "config"
        )
    )
    by_id = {s.pk: s for s in steps}
    upstream: dict[int, list[ReductionStep]] = {s.pk: [] for s in steps}
    for down, up in ReductionStep.depends_on.through.objects.filter(
        from_reductionstep__pipeline_id__in=ids
    ).values_list("from_reductionstep_id", "to_reductionstep_id"):
        if down in by_id and up in by_id:
            upstream[down].append(by_id[up])
    result: dict[int, list[tuple[ReductionStep, list[ReductionStep]]]] = {pk: [] for pk in ids}
    grouped: dict[int, list[ReductionStep]] = defaultdict(list)
    for s in steps:
        grouped[s.pipeline_id].append(s)
    for pipeline_id, members in grouped.items():
        done: set[int] = set()
        remaining = sorted(members, key=lambda s: (s.step_order, s.pk))
        while remaining:
            ready = [
                s for s in remaining if all(u.pk in done for u in upstream[s.pk])
            ] or remaining[:1]
            for s in ready:
                result[pipeline_id].append((s, upstream[s.pk]))
                done.add(s.pk)
            remaining = [s for s in remaining if s.pk not in done]
    return result


def _roots_allowed(pipeline: Pipeline, *, cron_due: bool) -> bool:
    if pipeline.trigger_type == TriggerType.CONTINUOUS:
        return True
    if pipeline.trigger_type == TriggerType.CRON:
        return cron_due
    return False  # MANUAL: only pipeline_trigger


@dataclass
class _Affected:
    """What an incremental evaluation of one pipeline looks at."""

    new_packages: list[int] = field(default_factory=list)
    # step id -> sub-group keys to look at (upstream completed, cooldown ended)
    keys: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    # step id -> packages of upstream runs that completed (their sub-groups are to look at)
    upstream_packages: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))

    def __bool__(self) -> bool:
        return bool(self.new_packages or self.keys or self.upstream_packages)


def _evaluate(
    pipeline: Pipeline,
    *,
    now: datetime,
    full: bool,
    roots: bool,
    affected: _Affected | None = None,
    actor: str,
    steps: list[tuple[ReductionStep, list[ReductionStep]]] | None = None,
) -> list[ExecutedReductionStep]:
    """Evaluate ``pipeline`` (all sub-groups when ``full``, else those ``affected`` names) and
    create the due runs, upstream steps first so a run created now makes its downstream wait.
    ``steps`` are the pipeline's ``_steps_of`` when the caller loaded them already."""
    from pipelines.grouping import package_sub_groups

    packages = pipeline_packages(pipeline)
    new_packages: list[int] = []
    if affected is not None and affected.new_packages and roots:
        # One query per grouping tells whether any new package is this pipeline's at all.
        new_packages = list(
            packages.filter(pk__in=affected.new_packages).values_list("pk", flat=True)
        )
        if not new_packages and not affected.keys and not affected.upstream_packages:
            return []
    cache_by_group_by: dict[tuple[str, ...], dict[str, SubGroup]] = {}

    def all_sub_groups(group_by: list[str]) -> dict[str, SubGroup]:
        key = tuple(group_by)
        if key not in cache_by_group_by:
            cache_by_group_by[key] = package_sub_groups(packages, list(group_by))
        return cache_by_group_by[key]

    created: list[ExecutedReductionStep] = []
    for step, upstream in steps if steps is not None else _ordered_steps(pipeline):
        group_by = list(step.group_by or [])
        if not upstream and not roots:
            continue
        if full:
            sub_groups = all_sub_groups(group_by)
        else:
            assert affected is not None
            keys = set(affected.keys.get(step.pk, ()))
            touching = set(affected.upstream_packages.get(step.pk, ()))
            if not upstream:
                touching |= set(new_packages)
            if touching:
                keys |= set(package_sub_groups(packages.filter(pk__in=touching), group_by))
            if not keys:
                continue
            groups = all_sub_groups(group_by)
            sub_groups = {k: groups[k] for k in keys if k in groups}
        if not sub_groups:
            continue
        for decision in _decide(step, upstream, sub_groups, now=now, full=full):
            if decision.reason != Reason.CREATE:
                continue
            run = _create_run(
                decision, triggered_by=ExecutedReductionStep.TriggeredBy.AUTOMATIC, actor=actor
            )
            if run is not None:
                created.append(run)
    return created


def _claim_cron_due(pipeline: Pipeline, now: datetime) -> bool:
    """True when a due time of the pipeline's cron expression passed that nobody evaluated yet;
    the conditional UPDATE of ``cron_last_due_at`` makes exactly one caller get True per due
    time. A pipeline's first due time is the first one after it was created."""
    from croniter import croniter

    expression = (pipeline.trigger_config or {}).get("cron", "")
    try:
        due = croniter(expression, now).get_prev(datetime)
    except (ValueError, KeyError, TypeError) as exc:
        log.error("pipeline %s: cron %r cannot be evaluated: %s", pipeline, expression, exc)
        return False
    if due.tzinfo is None:
        due = timezone.make_aware(due, timezone.get_current_timezone())
    last = pipeline.cron_last_due_at or pipeline.created_at
    if due <= last:
        return False
    claimed = (
        Pipeline.objects.filter(pk=pipeline.pk)
        .filter(Q(cron_last_due_at__isnull=True) | Q(cron_last_due_at__lt=due))
        .update(cron_last_due_at=due)
    )
    if claimed:
        pipeline.cron_last_due_at = due
    return bool(claimed)


def cron_next_due(pipeline: Pipeline, now: datetime | None = None) -> datetime | None:
    """The next due time of a CRON pipeline (None for other types or a bad expression)."""
    from croniter import croniter

    if pipeline.trigger_type != TriggerType.CRON:
        return None
    try:
        due = croniter((pipeline.trigger_config or {}).get("cron", ""), now or timezone.now())
        result = due.get_next(datetime)
    except (ValueError, KeyError, TypeError):
        return None
    return result if result.tzinfo else timezone.make_aware(result)


def pipeline_evaluate(
    pipeline: Pipeline, *, full: bool = False, now: datetime | None = None
) -> list[ExecutedReductionStep]:
    """Evaluate one pipeline now and create its due PENDING runs; returns them.

    ``full`` looks at every sub-group of every step; otherwise only what changed since the
    pipeline's ``trigger_watermark`` (new packages, completed upstream runs, ended cooldowns);
    a pipeline never evaluated is evaluated in full. Disabled pipelines and pipelines of another
    processing location get nothing. Root steps follow the trigger type (CRON: only when a due
    time passed, claimed once; MANUAL: never here). Advances the watermark (and
    ``full_evaluation_at`` after a full evaluation). Safe to run twice and from several
    managers at once."""
    now = now or timezone.now()
    location = processing_location_id()
    if not pipeline.enabled or (
        location is not None and pipeline.processing_location_id != location
    ):
        return []
    full = full or pipeline.trigger_watermark is None
    cron_due = pipeline.trigger_type == TriggerType.CRON and _claim_cron_due(pipeline, now)
    roots = _roots_allowed(pipeline, cron_due=cron_due)
    if cron_due:
        full = True  # a due time looks at everything that arrived since the last one
    affected = None if full else _changes([pipeline], now=now)[pipeline.pk]
    runs = _evaluate(
        pipeline, now=now, full=full, roots=roots, affected=affected, actor="trigger-manager"
    )
    _advance(pipeline, now=now, full=full)
    return runs


def _advance(pipeline: Pipeline, *, now: datetime, full: bool) -> None:
    """Move the watermark forward (never back: another manager may be ahead)."""
    mark = now - WATERMARK_LAG
    Pipeline.objects.filter(pk=pipeline.pk).filter(
        Q(trigger_watermark__isnull=True) | Q(trigger_watermark__lt=mark)
    ).update(trigger_watermark=mark)
    pipeline.trigger_watermark = max(filter(None, [pipeline.trigger_watermark, mark]))
    if full:
        Pipeline.objects.filter(pk=pipeline.pk).filter(
            Q(full_evaluation_at__isnull=True) | Q(full_evaluation_at__lt=now)
        ).update(full_evaluation_at=now)
        pipeline.full_evaluation_at = now


def _changes(
    pipelines: Sequence[Pipeline],
    *,
    now: datetime,
    steps_of: dict[int, list[tuple[ReductionStep, list[ReductionStep]]]] | None = None,
) -> dict[int, _Affected]:
    """What changed since each pipeline's watermark, in a few queries for all of them: packages
    archived since (one query), runs of their steps finished since (one), sub-groups whose
    cooldown ended since (one per distinct cooldown). ``steps_of``: the pipelines'
    ``_steps_of`` when the caller has them (else two more queries)."""
    result: dict[int, _Affected] = {p.pk: _Affected() for p in pipelines}
    if not pipelines:
        return result
    earliest = now - timedelta(seconds=settings.WORKFLOW_TRIGGER_FULL_INTERVAL)
    marks: dict[int, datetime] = {p.pk: p.trigger_watermark or earliest for p in pipelines}
    since = min(marks.values())
    # New packages: filtered per pipeline by its grouping in _evaluate (pk__in, one query).
    new = list(
        RawDataPackage.objects.filter(archived_at__gt=since).values_list("pk", "archived_at")
    )
    if steps_of is None:
        steps_of = _steps_of(pipelines)
    steps = [
        (s.pk, s.pipeline_id, s.cooldown_seconds)
        for p in pipelines
        for s, _upstream in steps_of.get(p.pk, [])
    ]
    pipeline_of = {pk: pipeline_id for pk, pipeline_id, _c in steps}
    for pipeline in pipelines:
        mark = marks[pipeline.pk]
        result[pipeline.pk].new_packages = [pk for pk, at in new if at and at > mark]
    # Upstream runs finished since (completed, and cancelled or failed, which may release a
    # downstream sub-group that waited for them): their packages' sub-groups downstream.
    completed = list(
        ExecutedReductionStep.objects.filter(
            status__in=[RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED],
            updated_at__gt=since,
            reduction_step_id__in=list(pipeline_of),
        ).values_list("pk", "reduction_step_id", "updated_at")
    )
    if completed:
        downstream: dict[int, list[int]] = defaultdict(list)
        for down, up in ReductionStep.depends_on.through.objects.filter(
            to_reductionstep_id__in={s for _r, s, _u in completed}
        ).values_list("from_reductionstep_id", "to_reductionstep_id"):
            downstream[up].append(down)
        run_ids = [
            pk
            for pk, step_id, at in completed
            if downstream.get(step_id) and at > marks[pipeline_of[step_id]]
        ]
        packages: dict[int, set[int]] = defaultdict(set)
        for run_id, package_id in RunInputs.objects.filter(
            executedreductionstep_id__in=run_ids
        ).values_list("executedreductionstep_id", "rawdatapackage_id"):
            packages[run_id].add(package_id)
        step_of = {pk: step_id for pk, step_id, _u in completed}
        for run_id in run_ids:
            for down in downstream[step_of[run_id]]:
                result[pipeline_of[down]].upstream_packages[down] |= packages[run_id]
    # Cooldowns that ended since the watermark: the last run of the sub-group was created in
    # (mark - cooldown, now - cooldown]. A sub-group deferred by its cooldown has such a run.
    by_cooldown: dict[int, list[int]] = defaultdict(list)
    for pk, _pipeline, cooldown in steps:
        if cooldown:
            by_cooldown[cooldown].append(pk)
    for cooldown, step_ids in by_cooldown.items():
        delta = timedelta(seconds=cooldown)
        for step_id, key, created_at in ExecutedReductionStep.objects.filter(
            reduction_step_id__in=step_ids,
            created_at__gt=since - delta,
            created_at__lte=now - delta,
        ).values_list("reduction_step_id", "sub_group_key", "created_at"):
            if created_at > marks[pipeline_of[step_id]] - delta:
                result[pipeline_of[step_id]].keys[step_id].add(key)
    return result


# --- the manager tick ---------------------------------------------------------------------------
def trigger_manager_tick(*, owner: str, now: datetime | None = None) -> dict[str, int]:
    """One tick of the trigger manager (MANAGERS["trigger"]): evaluate the served pipelines by
    priority. A pipeline whose full re-evaluation is due (``WORKFLOW_TRIGGER_FULL_INTERVAL``
    since the last, or never evaluated) is claimed for it by a conditional UPDATE of
    ``full_evaluation_at`` (so of several managers one does it), while the tick has spent less
    than half the manager interval on full evaluations (the rest wait for the next tick);
    the others are evaluated incrementally from their watermark. A pipeline whose evaluation
    raises is logged and counted and the others go on. Returns {"created": runs created,
    "full": pipelines re-evaluated in full, "errors": pipelines that failed} (all 0 when nothing
    was due, so ``facility run --until-idle`` can stop)."""
    return _tick(owner=owner, now=now, allow_full=True)


def trigger_evaluate_now(*, owner: str, now: datetime | None = None) -> dict[str, int]:
    """An on-demand incremental evaluation (the ``evaluate_triggers_now`` task, queued when a
    package is archived or a run completes): like a tick, but it never starts a full
    re-evaluation except of pipelines never evaluated."""
    _forget_queued()  # a package archived from now on queues another evaluation
    return _tick(owner=owner, now=now, allow_full=False)


def _tick(*, owner: str, now: datetime | None, allow_full: bool) -> dict[str, int]:
    started = time.monotonic()
    now = now or timezone.now()
    actor = f"trigger-manager:{owner}"[:200]
    budget = settings.WORKFLOW_MANAGER_INTERVAL / 2
    full_every = timedelta(seconds=settings.WORKFLOW_TRIGGER_FULL_INTERVAL)
    created: list[ExecutedReductionStep] = []
    full_count = errors = 0
    incremental: list[Pipeline] = []
    cron_due: dict[int, bool] = {}
    served = list(served_pipelines())
    steps = _steps_of(served)
    for pipeline in served:
        cron_due[pipeline.pk] = pipeline.trigger_type == TriggerType.CRON and _claim_cron_due(
            pipeline, now
        )
        never = pipeline.trigger_watermark is None
        stale = (
            pipeline.full_evaluation_at is None or pipeline.full_evaluation_at <= now - full_every
        )
        if (
            cron_due[pipeline.pk]
            or never
            or (allow_full and stale and time.monotonic() - started < budget)
        ):
            if not cron_due[pipeline.pk] and not _claim_full(pipeline, now, full_every):
                continue  # another manager is evaluating it in full right now
            roots = _roots_allowed(pipeline, cron_due=cron_due[pipeline.pk])
            try:
                created += _evaluate(
                    pipeline,
                    now=now,
                    full=True,
                    roots=roots,
                    actor=actor,
                    steps=steps[pipeline.pk],
                )
            except Exception:
                # One broken pipeline (rules edited around validation, say) must not stop the
                # others; its watermark stays, so the next ticks look at its changes again.
                log.exception("trigger manager: evaluating pipeline %s failed", pipeline)
                errors += 1
                continue
            _advance(pipeline, now=now, full=cron_due[pipeline.pk])
            full_count += 1
        else:
            incremental.append(pipeline)
    changes = _changes(incremental, now=now, steps_of=steps)
    advanced: list[int] = []
    for pipeline in incremental:
        affected = changes[pipeline.pk]
        if affected:
            roots = _roots_allowed(pipeline, cron_due=False)
            try:
                created += _evaluate(
                    pipeline,
                    now=now,
                    full=False,
                    roots=roots,
                    affected=affected,
                    actor=actor,
                    steps=steps[pipeline.pk],
                )
            except Exception:
                log.exception("trigger manager: evaluating pipeline %s failed", pipeline)
                errors += 1
                continue
        advanced.append(pipeline.pk)
    # One UPDATE for all of them (never backwards: another manager may be ahead).
    mark = now - WATERMARK_LAG
    Pipeline.objects.filter(pk__in=advanced).filter(
        Q(trigger_watermark__isnull=True) | Q(trigger_watermark__lt=mark)
    ).update(trigger_watermark=mark)
    return {"created": len(created), "full": full_count, "errors": errors}


def _claim_full(pipeline: Pipeline, now: datetime, every: timedelta) -> bool:
    claimed = (
        Pipeline.objects.filter(pk=pipeline.pk)
        .filter(Q(full_evaluation_at__isnull=True) | Q(full_evaluation_at__lte=now - every))
        .update(full_evaluation_at=now)
    )
    if claimed:
        pipeline.full_evaluation_at = now
    return bool(claimed)


def queue_trigger_evaluation() -> None:
    """Queue one ``evaluate_triggers_now`` after the current transaction commits (at once
    outside one). Called when a package is archived and when a run completes. Bursts coalesce:
    while one evaluation is queued and not started, no second is sent (a cache key the task
    deletes when it starts, so anything committed after that queues a new one; the key expires
    after a minute should the queued task be lost)."""
    transaction.on_commit(_send_evaluation)


def _send_evaluation() -> None:
    from pipelines.tasks import evaluate_triggers_now

    # Failures are logged, never raised: the archiving already committed, and the periodic
    # tick is the safety net.
    try:
        first = cache.add(QUEUED_KEY, "1", timeout=60)
    except Exception:
        log.warning("trigger evaluation: the cache is unavailable; queueing without coalescing")
        first = True
    if not first:
        return
    try:
        evaluate_triggers_now.delay()
    except Exception:
        log.exception("could not queue a trigger evaluation; the next tick will evaluate")
        _forget_queued()


def _forget_queued() -> None:
    try:
        cache.delete(QUEUED_KEY)
    except Exception:
        log.warning("trigger evaluation: the cache is unavailable", exc_info=True)


# --- manual trigger and the gap -----------------------------------------------------------------
def pipeline_trigger(
    pipeline: Pipeline,
    *,
    sub_groups: Sequence[str] | None = None,
    user: Any = None,
    dry_run: bool = False,
) -> list[Decision]:
    """ "Run now" (MANUAL pipelines; allowed for any trigger type): create a PENDING run for
    each sub-group of each root step that has a gap (``sub_groups``: only those keys). Goes
    through the gap (covered packages are not re-run) but not the cooldown (someone asked).
    Downstream steps follow as their upstream runs complete. Returns one Decision per sub-group
    looked at; ``decision.run`` is the created run (None for a dry run or an occupied
    sub-group). Raises ``TriggerError`` (nothing created) for a disabled pipeline or a key that
    is no sub-group of any root step."""
    from pipelines.grouping import package_sub_groups

    if not pipeline.enabled:
        raise TriggerError(f"pipeline {pipeline.name} is disabled; enable it to trigger it")
    packages = pipeline_packages(pipeline)
    roots = [(s, u) for s, u in _ordered_steps(pipeline) if not u]
    groups = {s.pk: package_sub_groups(packages, list(s.group_by or [])) for s, _u in roots}
    if sub_groups is not None:
        known = set().union(*(g.keys() for g in groups.values())) if groups else set()
        unknown = sorted(set(sub_groups) - known)
        if unknown:
            shown = ", ".join(sorted(known)[:20]) or "none (no matching data)"
            raise TriggerError(
                f"pipeline {pipeline.name}: no sub-group {', '.join(map(repr, unknown))}; "
                f"known: {shown}"
            )
    who = getattr(user, "username", "") or "unknown user"
    now = timezone.now()
    decisions: list[Decision] = []
    for step, _upstream in roots:
        chosen = groups[step.pk]
        if sub_groups is not None:
            chosen = {k: v for k, v in chosen.items() if k in set(sub_groups)}
        for decision in _decide(step, [], chosen, now=now, full=False, respect_cooldown=False):
            decisions.append(decision)
            if decision.reason == Reason.CREATE and not dry_run:
                _create_run(
                    decision,
                    triggered_by=ExecutedReductionStep.TriggeredBy.MANUAL,
                    actor=f"user:{who}",
                )
    return decisions


def step_gap(step: ReductionStep, *, now: datetime | None = None) -> dict[str, SubGroup]:
    """The gap of every sub-group of ``step`` that has one: {key: SubGroup whose package_ids are
    the uncovered (for a downstream step: uncovered eligible) packages}. Ignores cooldown,
    occupation and trigger type; reads only."""
    from pipelines.grouping import SubGroup, package_sub_groups

    pipeline = step.pipeline
    upstream = dict(_ordered_steps(pipeline)).get(step, [])
    groups = package_sub_groups(pipeline_packages(pipeline), list(step.group_by or []))
    return {
        d.key: SubGroup(key=d.key, values=d.values, package_ids=d.gap)
        for d in _decide(step, upstream, groups, now=now or timezone.now(), full=False)
        if d.gap
    }


# --- why ----------------------------------------------------------------------------------------
def explain_step(step: ReductionStep, sub_group_key: str | None = None) -> str:
    """One sentence for ``manage.py why``: why (step, sub-group) has no run yet, or what the
    next evaluation does. Without a key, a summary over the step's sub-groups (or the one
    sub-group when there is only one). Reads only."""
    from pipelines.grouping import package_sub_groups

    pipeline = step.pipeline
    label = f"step {pipeline.name}/{step.name}"
    if not pipeline.enabled:
        return (
            f"{label}: pipeline {pipeline.name} is disabled, so the trigger manager creates "
            "no runs for it."
        )
    try:
        location = processing_location_id()
    except ImproperlyConfigured as exc:
        return f"{label}: this instance serves no location ({exc})."
    if location is not None and pipeline.processing_location_id != location:
        return (
            f"{label}: pipeline {pipeline.name} runs at processing location "
            f"{pipeline.processing_location}, not at this instance's (PROCESSING_LOCATION_ID="
            f"{location}); that location's trigger manager evaluates it."
        )
    upstream = dict(_ordered_steps(pipeline)).get(step, [])
    try:
        groups = package_sub_groups(pipeline_packages(pipeline), list(step.group_by or []))
    except ValidationError as exc:
        return (
            f"{label}: grouping {pipeline.data_grouping.name} or the step's group_by is invalid, "
            f"so no run can be made: {'; '.join(exc.messages)}."
        )
    if sub_group_key is not None:
        if sub_group_key not in groups:
            return (
                f"{label}: no matching data for sub-group {sub_group_key!r} (grouping "
                f"{pipeline.data_grouping.name} selects no package of it"
                + (
                    ""
                    if _rules_mention_state(pipeline.data_grouping.filter_rules)
                    else " that is archived"
                )
                + ")."
            )
        groups = {sub_group_key: groups[sub_group_key]}
    if not groups:
        return f"{label}: no matching data: grouping {pipeline.data_grouping.name} selects no " + (
            "package."
            if _rules_mention_state(pipeline.data_grouping.filter_rules)
            else "archived package."
        )
    now = timezone.now()
    decisions = _decide(step, upstream, groups, now=now, full=False)
    if len(decisions) == 1:
        return f"{label} [{decisions[0].key}]: {_words(decisions[0], pipeline, upstream, now)}."
    counts: dict[str, int] = defaultdict(int)
    for d in decisions:
        counts[_short(d, pipeline, upstream)] += 1
    parts = ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda i: -i[1]))
    return f"{label}: {len(decisions)} sub-groups: {parts} (give a sub-group key for details)."


def _gated(pipeline: Pipeline, upstream: Sequence[ReductionStep], now: datetime) -> str:
    """Why a root step's gap waits for its trigger type, or '' when it does not."""
    if upstream or pipeline.trigger_type == TriggerType.CONTINUOUS:
        return ""
    if pipeline.trigger_type == TriggerType.MANUAL:
        return "pipeline is MANUAL: it runs only when someone triggers it (pipeline_trigger)"
    due = cron_next_due(pipeline, now)
    when = due.isoformat(timespec="seconds") if due else "never (invalid cron expression)"
    cron = (pipeline.trigger_config or {}).get("cron", "")
    return f"pipeline is CRON ({cron}): evaluated next at {when}"


def _words(
    d: Decision, pipeline: Pipeline, upstream: Sequence[ReductionStep], now: datetime
) -> str:
    left_out = (
        f"; {len(d.excluded)} packages left out (upstream failed for good or cancelled)"
        if d.excluded
        else ""
    )
    if d.reason == Reason.NO_DATA:
        return "no matching data"
    if d.reason == Reason.OCCUPIED:
        status = (
            ExecutedReductionStep.objects.filter(pk=d.run_id or 0)
            .values_list("status", flat=True)
            .first()
        )
        return f"run {d.run_id} is {status} for this sub-group (one run at a time)"
    if d.reason == Reason.WAITING_UPSTREAM:
        run = (
            ExecutedReductionStep.objects.filter(pk=d.run_id or 0)
            .select_related("reduction_step")
            .first()
        )
        what = f"{run.reduction_step.name}, {run.status}" if run else "gone"
        return f"waiting for upstream run {d.run_id} ({what}) to complete"
    if d.reason == Reason.UPSTREAM_LEFT_OUT:
        return (
            f"its data's upstream runs failed for good or were cancelled, so it is left out "
            f"({d.excluded[0]['reason']}{' and others' if len(d.excluded) > 1 else ''})"
        )
    if d.reason == Reason.NO_UPSTREAM_DATA:
        names = ", ".join(u.name for u in upstream)
        return f"no package of it has a completed run of upstream step {names} yet"
    if d.reason == Reason.GAP_EMPTY:
        return (
            f"gap empty: all {len(d.package_ids)} packages are inputs of run {d.run_id} or an "
            f"earlier one; only new data reopens it{left_out}"
        )
    if d.reason == Reason.COOLDOWN:
        assert d.until is not None
        return (
            f"gap of {len(d.gap)} new packages, in cooldown until "
            f"{d.until.isoformat(timespec='seconds')} (run {d.run_id} was created "
            f"less than {d.step.cooldown_seconds} s before){left_out}"
        )
    gated = _gated(pipeline, upstream, now)
    if gated:
        return f"gap of {len(d.gap)} new packages, but the {gated}"
    return (
        f"gap of {len(d.gap)} new packages: the next evaluation creates a run over all "
        f"{len(d.package_ids)}{left_out}"
    )


def _short(d: Decision, pipeline: Pipeline, upstream: Sequence[ReductionStep]) -> str:
    if d.reason == Reason.CREATE:
        gated = _gated(pipeline, upstream, timezone.now())
        return (
            "with a gap waiting for their trigger"
            if gated
            else "with a gap (a run at the next evaluation)"
        )
    return {
        Reason.NO_DATA: "without data",
        Reason.OCCUPIED: "with a run in progress",
        Reason.WAITING_UPSTREAM: "waiting for an upstream run",
        Reason.UPSTREAM_LEFT_OUT: "left out (upstream failed or cancelled)",
        Reason.NO_UPSTREAM_DATA: "without completed upstream data",
        Reason.GAP_EMPTY: "with an empty gap",
        Reason.COOLDOWN: "in cooldown",
    }[d.reason]
