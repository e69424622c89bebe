"""``manage.py why <kind>:<id>``: state, the latest events, and one sentence on what an object
waits for or what blocks it."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from pipelines.services.why import KINDS, WhyError, explain, resolve


class Command(BaseCommand):
    help = (
        "Explain why a package, file, copy, transfer, archive transfer, staging job, deletion "
        "task, repair, bundle, run or step is where it is. Kinds: "
        + ", ".join(f"{kind}:<id>" for kind in KINDS)
        + " (a package or bundle also by name, a file by relative path, a step as "
        "step:<pipeline>/<step>[@<sub group key>])."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("object", help="what to explain, e.g. package:42 or run:7")
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            obj, sub_group = resolve(options["object"])
            result = explain(obj, sub_group_key=sub_group)
        except WhyError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            payload = {
                "object": result.title,
                "states": result.states,
                "why": result.sentence,
                "events": [
                    {
                        "at": event.created_at.isoformat(),
                        "field": event.field,
                        "from": event.from_state,
                        "to": event.to_state,
                        "actor": event.actor,
                        "reason": event.reason,
                    }
                    for event in result.events
                ],
            }
            self.stdout.write(json.dumps(payload, indent=2))
            return
        self.stdout.write(result.title)
        for name, value in result.states.items():
            self.stdout.write(f"  {name}: {value}")
        self.stdout.write(f"Why: {result.sentence}")
        if result.events:
            self.stdout.write("Latest events (newest first):")
        for event in result.events:
            when = timezone.localtime(event.created_at).strftime("%Y-%m-%d %H:%M:%S")
            change = f"{event.from_state or '(created)'} -> {event.to_state}"
            reason = f": {event.reason}" if event.reason else ""
            self.stdout.write(f"  {when}  {event.field} {change}  [{event.actor}]{reason}")
