"""The gap of a (step, sub-group): which packages a pipeline takes, what its runs already
cover, what upstream runs allow, and the decision for each sub-group (reads only). The
semantics are stated in ``pipelines/services/triggers/__init__.py``."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import QuerySet
from django.utils import timezone

from pipelines.models import (
    ACTIVE_RUN_STATUSES,
    DataLocation,
    ExecutedReductionStep,
    PackageState,
    Pipeline,
    RawDataPackage,
    ReductionStep,
    RunStatus,
)

if TYPE_CHECKING:
    from pipelines.grouping import SubGroup

log = logging.getLogger(__name__)

RunInputs = ExecutedReductionStep.input_raw_packages.through


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


def runs_of_steps(step_ids: Sequence[int]) -> dict[int, dict[str, list[RunInfo]]]:
    """Every run of the given steps with its inputs, {step id: {key: runs newest first}}: one
    query per 500 steps (runs LEFT JOIN their inputs)."""
    result: dict[int, dict[str, list[RunInfo]]] = defaultdict(lambda: defaultdict(list))
    by_id: dict[int, RunInfo] = {}
    ids = list(step_ids)
    for start in range(0, len(ids), 500):
        rows = (
            ExecutedReductionStep.objects.filter(reduction_step_id__in=ids[start : start + 500])
            .order_by("-created_at", "-pk")
            .values_list(
                "reduction_step_id",
                "pk",
                "sub_group_key",
                "status",
                "failed_for_good",
                "created_at",
                "input_raw_packages",
            )
        )
        for step_id, pk, key, status, failed_for_good, created_at, package_id in rows:
            info = by_id.get(pk)
            if info is None:
                info = by_id[pk] = RunInfo(pk, status, failed_for_good, created_at)
                result[step_id][key].append(info)
            if package_id is not None:
                info.packages.add(package_id)
    return result


def _latest_by_package(
    by_key: dict[str, list[RunInfo]],
) -> tuple[dict[int, RunInfo], dict[int, int]]:
    """``_upstream_runs`` from runs already loaded."""
    runs = {r.id: r for group in by_key.values() for r in group}
    latest: dict[int, int] = {}
    for info in runs.values():
        for package_id in info.packages:
            current = latest.get(package_id)
            if current is None or (info.created_at, info.id) > (runs[current].created_at, current):
                latest[package_id] = info.id
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


def decide(
    step: ReductionStep,
    upstream: Sequence[ReductionStep],
    sub_groups: dict[str, SubGroup],
    *,
    now: datetime,
    full: bool,
    respect_cooldown: bool = True,
    runs_of: dict[int, dict[str, list[RunInfo]]] | None = None,
) -> list[Decision]:
    """Decide every sub-group of ``step`` without writing anything. ``full`` loads all of the
    step's runs (one query each) instead of those of the given sub-groups; ``runs_of`` are all
    runs of this step and its upstream steps by step id (``runs_of_steps``), already loaded."""
    if runs_of is not None:
        runs_by_key = runs_of.get(step.pk, {})
    else:
        runs_by_key = _runs_by_key(step, None if full else sub_groups.keys())
    eligible_of: dict[str, list[int]] = {}
    excluded_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    waiting_of: dict[str, int] = {}
    upstream_runs_of: dict[str, set[int]] = defaultdict(set)
    if upstream:
        wanted: set[int] | None = None
        if not full:
            wanted = {p for group in sub_groups.values() for p in group.package_ids}
        if runs_of is not None:
            states = [(u, *_latest_by_package(runs_of.get(u.pk, {}))) for u in upstream]
        else:
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


def ordered_steps(pipeline: Pipeline) -> list[tuple[ReductionStep, list[ReductionStep]]]:
    """The pipeline's steps with their upstream steps, upstream first."""
    return pipeline_steps([pipeline])[pipeline.pk]


def pipeline_steps(
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


def step_gap(step: ReductionStep, *, now: datetime | None = None) -> dict[str, SubGroup]:
    """The gap of every sub-group of ``step`` that has one: {key: SubGroup whose package_ids are
    the uncovered (for a downstream step: uncovered eligible) packages}. Ignores cooldown,
    occupation and trigger type; reads only."""
    from pipelines.grouping import SubGroup, package_sub_groups

    pipeline = step.pipeline
    upstream = dict(ordered_steps(pipeline)).get(step, [])
    groups = package_sub_groups(pipeline_packages(pipeline), list(step.group_by or []))
    return {
        d.key: SubGroup(key=d.key, values=d.values, package_ids=d.gap)
        for d in decide(step, upstream, groups, now=now or timezone.now(), full=False)
        if d.gap
    }
