"""``manage.py trigger``: "run now" for a MANUAL pipeline (services/triggers: pipeline_trigger)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.models import Pipeline, TriggerType
from pipelines.services.triggers import TriggerError, pipeline_trigger


class Command(BaseCommand):
    help = (
        "Trigger a MANUAL pipeline now: a PENDING run for each sub-group of its first steps "
        "that has data no run has processed (--sub-group KEY, repeatable: only those). "
        "Downstream steps follow as their runs complete. Refuses CONTINUOUS and CRON "
        "pipelines (the trigger manager runs them; use backfill to re-run data). --dry-run "
        "prints what would be created and changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pipeline", help="pipeline name")
        parser.add_argument(
            "--sub-group",
            action="append",
            dest="sub_groups",
            metavar="KEY",
            help="a sub-group key, e.g. executed_obs_unit=... (repeatable)",
        )
        parser.add_argument("--dry-run", action="store_true", help="print, change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        pipeline = Pipeline.objects.filter(name=options["pipeline"]).first()
        if pipeline is None:
            known = ", ".join(
                Pipeline.objects.filter(trigger_type=TriggerType.MANUAL)
                .order_by("name")
                .values_list("name", flat=True)[:20]
            )
            raise CommandError(
                f"no pipeline named {options['pipeline']!r}; MANUAL pipelines: {known or 'none'}"
            )
        if pipeline.trigger_type != TriggerType.MANUAL:
            raise CommandError(
                f"pipeline {pipeline.name} is {pipeline.get_trigger_type_display().upper()}: the "
                "trigger manager runs it on its own; trigger is for MANUAL pipelines (to re-run "
                "its data use manage.py backfill)"
            )
        try:
            decisions = pipeline_trigger(
                pipeline, sub_groups=options["sub_groups"], dry_run=options["dry_run"]
            )
        except TriggerError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        verb = "would create" if options["dry_run"] else "created"
        made = 0
        for decision in decisions:
            created = decision.run is not None or (
                options["dry_run"] and decision.reason == "create"
            )
            made += int(created)
            what = (
                f"{verb} run {decision.run.pk if decision.run else ''}".rstrip()
                if created
                else f"nothing ({str(decision.reason).replace('_', ' ')})"
            )
            self.stdout.write(
                f"{decision.step.name} [{decision.key}]: {what}, {len(decision.package_ids)} "
                f"package(s), {len(decision.gap)} new"
            )
        tail = "; nothing changed" if options["dry_run"] else ""
        self.stdout.write(
            f"{pipeline.name}: {made} run(s) {verb}, {len(decisions) - made} sub-group(s) "
            f"without a new run{tail}"
        )
