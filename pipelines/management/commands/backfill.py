"""``manage.py backfill``: (re)run a pipeline or a step over the scans of a time range, as a
throttled, resumable campaign (services/campaigns.py)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.models import CampaignKind
from pipelines.services.campaigns import CampaignError, backfill_parameters

from ._campaigns import positive, run_campaign


class Command(BaseCommand):
    help = (
        "Backfill a pipeline (--pipeline NAME) or one step (--step PIPELINE/STEP) over the "
        "sub-groups holding packages whose scan started in [--since, --until): --missing-only "
        "runs sub-groups with unprocessed packages, --failed those whose latest run failed for "
        "good, --all every one. Creates a campaign (runs triggered_by=backfill) whose runs the "
        "workflow manager admits at most --max-active at a time, also after this command "
        "exits; running the same command again resumes it without duplicating runs. "
        "Downstream steps follow as their upstream runs complete (the campaign manager). "
        "--dry-run prints the runs it would create with their sub-groups and changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--pipeline", help="pipeline name: all of its steps")
        what.add_argument("--step", help="one step, as PIPELINE/STEP")
        parser.add_argument("--since", required=True, help="scan start time from (ISO, inclusive)")
        parser.add_argument("--until", required=True, help="scan start time to (ISO, exclusive)")
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument(
            "--missing-only",
            dest="mode",
            action="store_const",
            const="missing",
            help="sub-groups with packages no run has processed",
        )
        mode.add_argument(
            "--failed",
            dest="mode",
            action="store_const",
            const="failed",
            help="sub-groups whose latest run failed for good",
        )
        mode.add_argument(
            "--all", dest="mode", action="store_const", const="all", help="every sub-group"
        )
        parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        parser.add_argument(
            "--max-active",
            type=positive,
            help="runs of this campaign in the workflow at once (default 10; a resumed "
            "campaign keeps its own unless given)",
        )
        parser.add_argument("--reason", default="", help="why, recorded on the campaign")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            parameters = backfill_parameters(
                pipeline=options["pipeline"],
                step=options["step"],
                since=options["since"],
                until=options["until"],
                mode=options["mode"],
            )
        except CampaignError as exc:
            raise CommandError(str(exc)) from exc
        run_campaign(self, CampaignKind.BACKFILL, parameters, options)
