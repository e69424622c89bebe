"""``manage.py reprocess``: re-run the runs whose products are stale, as a throttled,
resumable campaign (services/campaigns.py, staleness in services/products.py)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.models import CampaignKind
from pipelines.services.campaigns import CampaignError, reprocess_parameters
from pipelines.services.products import products_refresh_staleness

from ._campaigns import positive, run_campaign


class Command(BaseCommand):
    help = (
        "Reprocess stale products: every completed run whose products are stale (made with a "
        "software version or instrument parameters that changed since, or from stale upstream "
        "products), optionally of one pipeline (--pipeline) or step (--step PIPELINE/STEP), is "
        "re-run over the same inputs as a campaign (runs triggered_by=reprocess) admitted at "
        "most --max-active at a time. Downstream runs wait for their upstream replacement. "
        "Replaced products are marked superseded, never deleted; new outputs go to new attempt "
        "directories. Running it again resumes. --dry-run prints the plan and changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        what = parser.add_mutually_exclusive_group()
        what.add_argument("--pipeline", help="only runs of this pipeline")
        what.add_argument("--step", help="only runs of this step, as PIPELINE/STEP")
        parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        parser.add_argument(
            "--max-active", type=positive, help="runs of this campaign in the workflow at once"
        )
        parser.add_argument("--reason", default="", help="why, recorded on the campaign")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            parameters = reprocess_parameters(pipeline=options["pipeline"], step=options["step"])
        except CampaignError as exc:
            raise CommandError(str(exc)) from exc
        if not options["dry_run"]:
            # Make the marks the admin shows agree with what is about to be re-run.
            products_refresh_staleness()
        run_campaign(self, CampaignKind.REPROCESS, parameters, options)
