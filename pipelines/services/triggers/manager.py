"""The trigger manager's writes: creating runs, evaluating pipelines (full, incremental,
CRON), the tick, the on-demand evaluation archiving queues, and the manual trigger. The
semantics are stated in ``pipelines/services/triggers/__init__.py``."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from pipelines.models import (
    DataGrouping,
    ExecutedReductionStep,
    Pipeline,
    RawDataPackage,
    ReductionStep,
    RunStatus,
    TriggerType,
)

from .creation import create_run
from .gap import (
    Decision,
    Reason,
    RunInfo,
    RunInputs,
    decide,
    ordered_steps,
    pipeline_packages,
    pipeline_steps,
    processing_location_id,
    runs_of_steps,
    served_pipelines,
)

if TYPE_CHECKING:
    from pipelines.grouping import SubGroup

log = logging.getLogger(__name__)

# Packages archived this long before a tick are looked at again by the next one: the archiving
# transaction stamps ``archived_at`` before it commits, so a package can become visible after a
# tick that already read past its timestamp. Those transactions do no I/O (the copy is verified
# before), so they commit within milliseconds; a later one is caught by the full re-evaluation.
# Re-reading is harmless (covered packages make no run) but costs a matching statement per 200
# groupings, so the lag is kept well under the tick interval.
WATERMARK_LAG = timedelta(seconds=15)
# The cache key that says an on-demand evaluation is queued and has not started yet.
QUEUED_KEY = "workflow:trigger-evaluation-queued"


class TriggerError(ValidationError):
    """A manual trigger that cannot be done (disabled pipeline, unknown sub-group): nothing was
    created."""


# --- evaluating a pipeline ----------------------------------------------------------------------
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
    # True once new_packages holds only this pipeline's own (``_match_new_packages``)
    matched: bool = False
    # Its grouping could not be compiled: the pipeline is counted as an error this tick
    failed: bool = False
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
    ``steps`` are the pipeline's ``pipeline_steps`` when the caller loaded them already."""
    from pipelines.grouping import package_sub_groups

    packages = pipeline_packages(pipeline)
    new_packages: list[int] = []
    if affected is not None and affected.new_packages and roots:
        new_packages = (
            affected.new_packages
            if affected.matched
            else list(packages.filter(pk__in=affected.new_packages).values_list("pk", flat=True))
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
    for step, upstream in steps if steps is not None else ordered_steps(pipeline):
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
        for decision in decide(step, upstream, sub_groups, now=now, full=full):
            if decision.reason != Reason.CREATE:
                continue
            run = create_run(
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


def _advance_all(pipeline_ids: Sequence[int], *, now: datetime) -> None:
    """``_advance`` of the watermark for many pipelines in one UPDATE."""
    mark = now - WATERMARK_LAG
    Pipeline.objects.filter(pk__in=list(pipeline_ids)).filter(
        Q(trigger_watermark__isnull=True) | Q(trigger_watermark__lt=mark)
    ).update(trigger_watermark=mark)


def _changes(
    pipelines: Sequence[Pipeline],
    *,
    now: datetime,
    steps_of: dict[int, list[tuple[ReductionStep, list[ReductionStep]]]] | None = None,
) -> dict[int, _Affected]:
    """What changed since each pipeline's watermark, in a few queries for all of them: packages
    archived since (one query), runs of their steps finished since (one), sub-groups whose
    cooldown ended since (one per distinct cooldown). ``steps_of``: the pipelines'
    ``pipeline_steps`` when the caller has them (else two more queries)."""
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
        # Only the ids and cooldowns: loading every step object each tick costs seconds with
        # 10^4 pipelines, and only the pipelines with changes need them.
        steps = list(
            ReductionStep.objects.filter(pipeline_id__in=[p.pk for p in pipelines]).values_list(
                "pk", "pipeline_id", "cooldown_seconds"
            )
        )
    else:
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
    opened = _opened_downstream(
        {pk: step_id for pk, step_id, at in completed if at > marks[pipeline_of[step_id]]}
    )
    for down, packages in opened.items():
        result[pipeline_of[down]].upstream_packages[down] |= packages
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


def _opened_downstream(step_of_run: dict[int, int]) -> dict[int, set[int]]:
    """What finished runs (run id -> its step id) can have opened downstream: step id of each
    step depending on one of theirs -> the input packages of those runs (their sub-groups are
    the ones to look at). Two queries; none without runs."""
    if not step_of_run:
        return {}
    downstream: dict[int, list[int]] = defaultdict(list)
    for down, up in ReductionStep.depends_on.through.objects.filter(
        to_reductionstep_id__in=set(step_of_run.values())
    ).values_list("from_reductionstep_id", "to_reductionstep_id"):
        downstream[up].append(down)
    opened: dict[int, set[int]] = defaultdict(set)
    for run_id, package_id in RunInputs.objects.filter(
        executedreductionstep_id__in=[r for r, step in step_of_run.items() if downstream.get(step)]
    ).values_list("executedreductionstep_id", "rawdatapackage_id"):
        for down in downstream[step_of_run[run_id]]:
            opened[down].add(package_id)
    return opened


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


def trigger_evaluate_downstream(
    run_ids: Sequence[int], *, owner: str, now: datetime | None = None
) -> dict[str, int]:
    """Evaluate only what these just-finished runs can have opened: the steps that depend on
    their steps, for the sub-groups their input packages fall in. A handful of queries, where an
    incremental evaluation looks at every served pipeline; the completion task calls it so a
    chain advances at the pace of its jobs. Watermarks are left alone: the next tick looks at
    the same runs again and creates nothing twice (the gap and the one-active-run constraint).
    Runs of pipelines this instance does not serve are ignored. Returns {"created": runs}."""
    now = now or timezone.now()
    actor = f"trigger-manager:{owner}"[:200]
    finished = list(
        ExecutedReductionStep.objects.filter(
            pk__in=list(run_ids),
            status__in=[RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED],
        ).values_list("pk", "reduction_step_id")
    )
    opened = _opened_downstream(dict(finished))
    if not opened:
        return {"created": 0}
    pipeline_of = dict(
        ReductionStep.objects.filter(pk__in=list(opened)).values_list("pk", "pipeline_id")
    )
    pipelines = list(served_pipelines().filter(pk__in=set(pipeline_of.values())))
    affected: dict[int, _Affected] = {p.pk: _Affected() for p in pipelines}
    for down, packages in opened.items():
        if pipeline_of[down] in affected:
            affected[pipeline_of[down]].upstream_packages[down] |= packages
    steps = pipeline_steps(pipelines)
    created: list[ExecutedReductionStep] = []
    for pipeline in pipelines:
        created += _evaluate(
            pipeline,
            now=now,
            full=False,
            roots=False,
            affected=affected[pipeline.pk],
            actor=actor,
            steps=steps[pipeline.pk],
        )
    return {"created": len(created)}


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
    steps: dict[int, list[tuple[ReductionStep, list[ReductionStep]]]] = {}
    wants_full: list[tuple[Pipeline, bool]] = []  # (pipeline, never evaluated)
    for pipeline in served:
        cron_due[pipeline.pk] = pipeline.trigger_type == TriggerType.CRON and _claim_cron_due(
            pipeline, now
        )
        never = pipeline.trigger_watermark is None
        stale = (
            pipeline.full_evaluation_at is None or pipeline.full_evaluation_at <= now - full_every
        )
        if cron_due[pipeline.pk]:
            # A due time looks at everything since the last one; claimed once above.
            try:
                created += _evaluate(pipeline, now=now, full=True, roots=True, actor=actor)
            except Exception:
                log.exception("trigger manager: evaluating pipeline %s failed", pipeline)
                errors += 1
                continue
            _advance(pipeline, now=now, full=True)
            full_count += 1
        elif never or (allow_full and stale):
            wants_full.append((pipeline, never))
        else:
            incremental.append(pipeline)
    # Full re-evaluations in batches, by priority, while the tick has spent less than half its
    # interval (never-evaluated pipelines always); the rest are evaluated incrementally now and
    # in full by a later tick.
    for start in range(0, len(wants_full), FULL_BATCH):
        chunk = wants_full[start : start + FULL_BATCH]
        if time.monotonic() - started >= budget:
            incremental += [p for p, never in chunk if not never]
            chunk = [(p, never) for p, never in chunk if never]
        claimed = _claim_full_batch([p for p, _never in chunk], now, full_every)
        steps.update(pipeline_steps(claimed))
        try:
            with transaction.atomic():  # the batch's reads and runs together, or per pipeline
                created += _evaluate_full_batch(claimed, now=now, actor=actor, steps_of=steps)
            evaluated = claimed
        except Exception:
            log.exception("trigger manager: a batch of full evaluations failed; one at a time")
            evaluated = []
            for pipeline in claimed:
                try:
                    created += _evaluate(
                        pipeline,
                        now=now,
                        full=True,
                        roots=_roots_allowed(pipeline, cron_due=False),
                        actor=actor,
                        steps=steps[pipeline.pk],
                    )
                except Exception:
                    # One broken pipeline (rules edited around validation, say) must not stop
                    # the others; its watermark stays, so later ticks look at it again.
                    log.exception("trigger manager: evaluating pipeline %s failed", pipeline)
                    errors += 1
                    continue
                evaluated.append(pipeline)
        _advance_all([p.pk for p in evaluated], now=now)
        full_count += len(evaluated)
    changes = _changes(incremental, now=now)
    for pipeline in incremental:
        if not _roots_allowed(pipeline, cron_due=False):
            changes[pipeline.pk].new_packages = []  # new data starts no root step of theirs
    _match_new_packages(incremental, changes)
    steps.update(pipeline_steps([p for p in incremental if changes[p.pk]]))
    advanced: list[int] = []
    for pipeline in incremental:
        affected = changes[pipeline.pk]
        if affected.failed:
            errors += 1
            continue
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
    _advance_all(advanced, now=now)
    return {"created": len(created), "full": full_count, "errors": errors}


# Groupings asked at once by ``_match_new_packages``: one UNION ALL statement (SQLite allows
# 500 compound SELECTs; a few hundred keeps the statement a manageable size).
MATCH_BATCH = 200
# Up to this many new packages are named by id in a matching statement; more are selected by
# ``archived_at`` (the definition) instead of a long IN list.
MATCH_IDS = 500


@functools.lru_cache(maxsize=50_000)
def _grouping_sql(
    rules_json: str, instrument_module_id: int | None, alias: str
) -> tuple[str, tuple]:
    """The compiled SELECT of the ids of a grouping's packages (``pipeline_packages``), by its
    rules and module: compiling 10^4 groupings' querysets each tick would cost seconds. Keyed by
    the rules themselves, so an edit (even one around ``save``) is a new entry."""
    grouping = DataGrouping(
        filter_rules=json.loads(rules_json), instrument_module_id=instrument_module_id
    )
    queryset = pipeline_packages(Pipeline(data_grouping=grouping)).order_by().values_list("id")
    sql, params = queryset.query.get_compiler(alias).as_sql()
    return sql, tuple(params)


def _match_new_packages(pipelines: Sequence[Pipeline], changes: dict[int, _Affected]) -> None:
    """Narrow each pipeline's ``new_packages`` (every package archived since its watermark) to
    its grouping's: one SELECT per grouping (compiled once, ``_grouping_sql``), ``MATCH_BATCH``
    of them sent as one UNION ALL statement restricted to the batch's new packages (by id, or
    by ``archived_at`` when there are many), so the tick's cost with new data grows with the
    number of statements, not of groupings. Pipelines without new packages are not asked."""
    from django.db import connection

    asking = [p for p in pipelines if changes[p.pk].new_packages]
    for start in range(0, len(asking), MATCH_BATCH):
        batch = asking[start : start + MATCH_BATCH]
        parts: list[str] = []
        params: list[Any] = []
        compiled = []
        for pipeline in batch:
            grouping = pipeline.data_grouping
            try:
                sql, grouping_params = _grouping_sql(
                    json.dumps(grouping.filter_rules, sort_keys=True),
                    grouping.instrument_module_id,
                    connection.alias,
                )
            except Exception:
                # Rules edited around validation: this pipeline fails, the batch goes on.
                log.exception("trigger manager: grouping %s cannot be compiled", grouping)
                changes[pipeline.pk].failed = True
                continue
            compiled.append(pipeline)
            parts.append(f"SELECT %s AS pipeline_id, g.id AS package_id FROM ({sql}) g")
            params += [pipeline.pk, *grouping_params]
        batch = compiled
        if not batch:
            continue
        new = sorted({p for pipeline in batch for p in changes[pipeline.pk].new_packages})
        if len(new) <= MATCH_IDS:
            where = f"m.package_id IN ({', '.join(['%s'] * len(new))})"
            params += new
        else:
            since = min(p.trigger_watermark for p in batch if p.trigger_watermark is not None)
            where = (
                f"m.package_id IN (SELECT id FROM {RawDataPackage._meta.db_table} "
                "WHERE archived_at > %s)"
            )
            params.append(since)
        statement = f"SELECT m.pipeline_id, m.package_id FROM ({' UNION ALL '.join(parts)}) m "
        matched: dict[int, set[int]] = defaultdict(set)
        with connection.cursor() as cursor:
            cursor.execute(statement + f"WHERE {where}", params)
            for pipeline_id, package_id in cursor.fetchall():
                matched[pipeline_id].add(package_id)
        for pipeline in batch:
            # Each pipeline keeps its own new packages (watermarks may differ in a batch).
            own = set(changes[pipeline.pk].new_packages)
            changes[pipeline.pk].new_packages = sorted(matched[pipeline.pk] & own)
            changes[pipeline.pk].matched = True


# Pipelines re-evaluated in full together: their claim, members, sub-groups and runs are read
# in a few statements for the whole batch instead of five or so for each pipeline.
FULL_BATCH = 100


def _members_of(pipelines: Sequence[Pipeline]) -> dict[int, list[int]]:
    """Each pipeline's packages (``pipeline_packages``), one SELECT per grouping (compiled
    once, ``_grouping_sql``) sent ``MATCH_BATCH`` at a time as one UNION ALL statement."""
    from django.db import connection

    members: dict[int, list[int]] = defaultdict(list)
    for start in range(0, len(pipelines), MATCH_BATCH):
        parts: list[str] = []
        params: list[Any] = []
        for pipeline in pipelines[start : start + MATCH_BATCH]:
            grouping = pipeline.data_grouping
            sql, grouping_params = _grouping_sql(
                json.dumps(grouping.filter_rules, sort_keys=True),
                grouping.instrument_module_id,
                connection.alias,
            )
            parts.append(f"SELECT %s AS pipeline_id, g.id AS package_id FROM ({sql}) g")
            params += [pipeline.pk, *grouping_params]
        with connection.cursor() as cursor:
            cursor.execute(" UNION ALL ".join(parts), params)
            for pipeline_id, package_id in cursor.fetchall():
                members[pipeline_id].append(package_id)
    return members


def _sub_groups_of(
    members: dict[int, list[int]], group_by: list[str]
) -> dict[int, dict[str, SubGroup]]:
    """Split each pipeline's members by ``group_by``: a package's sub-group key depends only on
    the package, so every package of the batch is keyed once (``package_sub_groups`` over them,
    5000 ids per statement) and each pipeline gets its own packages of each key."""
    from pipelines.grouping import SubGroup, package_sub_groups, sub_group_key

    result: dict[int, dict[str, SubGroup]] = {}
    if not group_by:
        key = sub_group_key([], {})
        for pipeline_id, ids in members.items():
            result[pipeline_id] = {key: SubGroup(key=key, values={}, package_ids=sorted(ids))}
        return result
    everyone = sorted({p for ids in members.values() for p in ids})
    key_of: dict[int, str] = {}
    values_of: dict[str, dict[str, Any]] = {}
    for start in range(0, len(everyone), 5000):
        chunk = RawDataPackage.objects.filter(pk__in=everyone[start : start + 5000])
        for key, group in package_sub_groups(chunk, group_by).items():
            values_of[key] = group.values
            for package_id in group.package_ids:
                key_of[package_id] = key
    for pipeline_id, ids in members.items():
        groups: dict[str, SubGroup] = {}
        for package_id in sorted(ids):
            key = key_of[package_id]
            if key not in groups:
                groups[key] = SubGroup(key=key, values=values_of[key])
            groups[key].package_ids.append(package_id)
        result[pipeline_id] = dict(sorted(groups.items()))
    return result


def _evaluate_full_batch(
    pipelines: Sequence[Pipeline],
    *,
    now: datetime,
    actor: str,
    steps_of: dict[int, list[tuple[ReductionStep, list[ReductionStep]]]],
) -> list[ExecutedReductionStep]:
    """``_evaluate(full=True)`` for several claimed CONTINUOUS/MANUAL/CRON-not-due pipelines
    at once (root steps only for CONTINUOUS ones): the same decisions, from members, sub-groups
    and runs read for the whole batch."""
    members = _members_of(pipelines)
    group_bys = {
        tuple(step.group_by or []) for p in pipelines for step, _upstream in steps_of.get(p.pk, [])
    }
    split = {gb: _sub_groups_of(members, list(gb)) for gb in group_bys}
    runs_of = runs_of_steps(
        [step.pk for p in pipelines for step, _upstream in steps_of.get(p.pk, [])]
    )
    created: list[ExecutedReductionStep] = []
    for pipeline in pipelines:
        roots = _roots_allowed(pipeline, cron_due=False)
        for step, upstream in steps_of.get(pipeline.pk, []):
            if not upstream and not roots:
                continue
            sub_groups = split[tuple(step.group_by or [])].get(pipeline.pk, {})
            if not sub_groups:
                continue
            for decision in decide(step, upstream, sub_groups, now=now, full=True, runs_of=runs_of):
                if decision.reason != Reason.CREATE:
                    continue
                run = create_run(
                    decision,
                    triggered_by=ExecutedReductionStep.TriggeredBy.AUTOMATIC,
                    actor=actor,
                )
                if run is not None:
                    created.append(run)
                    # Its downstream steps, decided next, must see it in progress.
                    info = RunInfo(run.pk, run.status, False, run.created_at)
                    info.packages.update(decision.package_ids)
                    runs_of[step.pk][decision.key].insert(0, info)
    return created


def _claim_full_batch(
    pipelines: Sequence[Pipeline], now: datetime, every: timedelta
) -> list[Pipeline]:
    """Claim the full re-evaluation of those of ``pipelines`` still due, by one conditional
    UPDATE that stamps ``full_evaluation_at = now`` and reads back who carries this stamp (the
    portable UPDATE ... RETURNING; two managers never share a microsecond ``now``)."""
    ids = [p.pk for p in pipelines]
    Pipeline.objects.filter(pk__in=ids).filter(
        Q(full_evaluation_at__isnull=True) | Q(full_evaluation_at__lte=now - every)
    ).update(full_evaluation_at=now)
    mine = set(
        Pipeline.objects.filter(pk__in=ids, full_evaluation_at=now).values_list("pk", flat=True)
    )
    for pipeline in pipelines:
        if pipeline.pk in mine:
            pipeline.full_evaluation_at = now
    return [p for p in pipelines if p.pk in mine]


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
    roots = [(s, u) for s, u in ordered_steps(pipeline) if not u]
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
        for decision in decide(step, [], chosen, now=now, full=False, respect_cooldown=False):
            decisions.append(decision)
            if decision.reason == Reason.CREATE and not dry_run:
                create_run(
                    decision,
                    triggered_by=ExecutedReductionStep.TriggeredBy.MANUAL,
                    actor=f"user:{who}",
                )
    return decisions
