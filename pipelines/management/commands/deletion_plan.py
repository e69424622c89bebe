"""``manage.py deletion_plan``: the deletion manager's dry run.

Lists every live copy (at one location, or everywhere) with its verdict: the copies the policy
would delete now and why, and for each kept copy the first rule keeping it. Changes nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.models import DataLocation
from pipelines.services.deletion import PlanEntry, deletion_plan


def _location(value: str) -> DataLocation:
    site, _, name = value.partition(":")
    if not site or not name:
        raise CommandError(f"--location {value!r}: write SITE:LOCATION, e.g. cologne:buffer")
    location = (
        DataLocation.objects.select_related("site").filter(site__short_name=site, name=name).first()
    )
    if location is None:
        raise CommandError(f"--location {value!r}: no such location")
    return location


def plan_summary(counts: Counter[str]) -> str:
    """'12 copies: 3 would be deleted, 9 kept (long_term_archive 4, retention 5)'."""
    deleted = counts.pop("deletable", 0)
    kept = sum(counts.values())
    total = deleted + kept
    rules = ", ".join(f"{rule} {n}" for rule, n in sorted(counts.items()))
    return f"{total} cop{'y' if total == 1 else 'ies'}: {deleted} would be deleted, {kept} kept" + (
        f" ({rules})" if rules else ""
    )


class Command(BaseCommand):
    help = (
        "Dry run of the deletion policy: list each live copy the deletion manager would delete "
        "now and why, and each kept copy with the first rule that keeps it, then a summary "
        "line. Nothing is changed. --location SITE:LOCATION limits it to one location; --json "
        "prints one JSON object per copy per line and a last line {'summary': ...}."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--location", type=_location, help="only copies at SITE:LOCATION")
        parser.add_argument(
            "--json", action="store_true", help="JSON lines instead of text (for scripts)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        counts: Counter[str] = Counter()
        as_json = options["json"]
        for entry in deletion_plan(location=options["location"]):
            counts[entry.verdict.rule] += 1
            if as_json:
                self.stdout.write(json.dumps(entry.as_dict()))
            else:
                self.stdout.write(_line(entry))
        summary = plan_summary(counts.copy())
        if as_json:
            self.stdout.write(json.dumps({"summary": summary, "counts": dict(counts)}))
        else:
            self.stdout.write(summary)


def _line(entry: PlanEntry) -> str:
    verdict = entry.verdict
    action = "DELETE" if verdict.deletable else f"KEEP [{verdict.rule}]"
    return (
        f"{action} copy {entry.copy_id} at {entry.location} ({entry.kind} {entry.object_name}, "
        f"{entry.status}): {verdict.reason}"
    )
