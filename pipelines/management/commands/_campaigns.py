"""What the ``backfill`` and ``reprocess`` commands share: printing a plan and running a
campaign with a progress bar (campaigns topic, issue 12)."""

from __future__ import annotations

import getpass
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from pipelines.models import Campaign, ExecutedReductionStep
from pipelines.services.campaigns import (
    CampaignError,
    CampaignPlan,
    campaign_advance,
    campaign_find,
    campaign_find_or_create,
    campaign_plan,
)

# Runs named one per line by a dry run; the summary counts the rest.
LISTED = 500


def positive(value: str) -> int:
    """argparse type of --max-active."""
    import argparse

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number}: at least 1 run at a time")
    return number


def _skipped(plan: CampaignPlan) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(plan.skipped.items())) or "none"


def run_campaign(
    command: BaseCommand, kind: str, parameters: dict[str, Any], options: dict[str, Any]
) -> None:
    """Dry run: print the plan, change nothing. Otherwise find or create the campaign, create
    its due runs with a progress bar and print a one-line summary."""
    label = kind.replace("reprocess", "reprocessing")
    try:
        if options["dry_run"]:
            existing = campaign_find(kind, parameters)
            plan = campaign_plan(kind, parameters, campaign=existing)
            for planned in plan.runs[:LISTED]:
                command.stdout.write(
                    f"would create: {planned.step} [{planned.key}] {len(planned.package_ids)} "
                    f"package(s) - {planned.why}"
                )
            if len(plan.runs) > LISTED:
                command.stdout.write(f"... and {len(plan.runs) - LISTED} more")
            for step, key, why in plan.waiting[:LISTED]:
                command.stdout.write(f"later: {step} [{key}] - {why}")
            resumed = f" (resuming {existing})" if existing else ""
            command.stdout.write(
                f"dry run{resumed}: {len(plan.runs)} run(s) would be created, "
                f"{len(plan.waiting)} sub-group(s) later, skipped: {_skipped(plan)}; "
                "nothing changed"
            )
            return
        campaign, created = campaign_find_or_create(
            kind,
            parameters,
            max_active=options.get("max_active"),
            reason=options.get("reason") or "",
            requested_by=f"command:{kind} by {_who()}",
        )
        plan = campaign_plan(kind, parameters, campaign=campaign)
    except CampaignError as exc:
        raise CommandError(str(exc)) from exc
    bar = tqdm(
        total=len(plan.runs),
        desc=f"{label} campaign {campaign.pk}",
        unit="run",
        file=sys.stderr,
        disable=not plan.runs or options.get("verbosity", 1) < 1,
    )

    def tick(run: ExecutedReductionStep) -> None:
        bar.update(1)

    try:
        result = campaign_advance(campaign, actor=f"command:{kind}", on_created=tick, plan=plan)
    finally:
        bar.close()
    campaign.refresh_from_db()
    command.stdout.write(_summary(campaign, created, result.created, result.waiting, plan))


def _summary(campaign: Campaign, created: bool, made: int, waiting: int, plan: CampaignPlan) -> str:
    how = "new" if created else "resumed"
    state = campaign.get_state_display().lower()
    return (
        f"{campaign} ({how}, {state}): {made} run(s) created now, {campaign.runs_created} in "
        f"all ({campaign.runs_completed} completed, {campaign.runs_active} active, "
        f"{campaign.runs_failed} failed), {waiting} sub-group(s) later, skipped: "
        f"{_skipped(plan)}; at most {campaign.max_active} admitted at a time"
    )


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
