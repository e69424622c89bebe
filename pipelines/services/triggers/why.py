"""``explain_step``: the one sentence ``manage.py why`` gives for a (step, sub-group), in
the words of the gap decisions (``gap.py``)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.utils import timezone

from pipelines.models import (
    ExecutedReductionStep,
    Pipeline,
    ReductionStep,
    RunStatus,
    TriggerType,
)

from .gap import (
    Decision,
    Reason,
    _rules_mention_state,
    decide,
    ordered_steps,
    pipeline_packages,
    processing_location_id,
)
from .manager import cron_next_due

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


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
    upstream = dict(ordered_steps(pipeline)).get(step, [])
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
    decisions = decide(step, upstream, groups, now=now, full=False)
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
        if status == RunStatus.FAILED:
            return (
                f"run {d.run_id} failed and awaits its retry, which keeps the sub-group "
                "(one run at a time)"
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
