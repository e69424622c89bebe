"""``manage.py grouping_preview``: how a grouping's packages split into sub-groups."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.grouping import GROUP_BY_DIMENSIONS, preview
from pipelines.models import DataGrouping, InstrumentModule


class Command(BaseCommand):
    help = (
        "Count the packages a data grouping selects, per sub-group of the given --group-by keys "
        f"({', '.join(GROUP_BY_DIMENSIONS)} or metadata.<dotted.path>; none: all in one). "
        "Name a saved grouping, or try rules before saving them with --rules. One aggregate "
        "query; no package is loaded and nothing is changed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("grouping", nargs="?", help="the data grouping's name")
        parser.add_argument(
            "--rules",
            metavar="JSON",
            help='unsaved filter rules instead of a grouping, e.g. \'[{"table": "Source", '
            '"column": "name", "operator": "eq", "value": "NGC253"}]\'',
        )
        parser.add_argument(
            "--instrument-module",
            metavar="INSTRUMENT/MODULE",
            help="with --rules: scope them to one instrument module, e.g. CHAI/LFA",
        )
        parser.add_argument(
            "--group-by",
            action="extend",
            nargs="+",
            default=[],
            metavar="KEY",
            help="dimensions to split by, in order (--group-by source line, or repeated)",
        )
        parser.add_argument(
            "--json", action="store_true", help='print [{"key", "values", "count"}] as JSON'
        )

    def handle(self, *args: Any, **options: Any) -> None:
        grouping = _grouping(options)
        label = grouping.name or "rules"
        try:
            counts = preview(grouping, list(options["group_by"]))
        except ValidationError as exc:
            raise CommandError(f"{label}: {'; '.join(exc.messages)}") from None
        if options["json"]:
            self.stdout.write(json.dumps(counts, indent=2))
            return
        total = sum(entry["count"] for entry in counts)
        width = max((len(entry["key"]) for entry in counts), default=0)
        for entry in counts:
            self.stdout.write(f"{entry['key']:<{width}}  {entry['count']:>8}")
        self.stdout.write(
            f"{label}: {total} package{'s' if total != 1 else ''} in "
            f"{len(counts)} sub-group{'s' if len(counts) != 1 else ''}"
        )


def _grouping(options: dict[str, Any]) -> DataGrouping:
    """The saved grouping named on the command line, or an unsaved one holding --rules."""
    if (options["grouping"] is None) == (options["rules"] is None):
        raise CommandError("name a data grouping or give --rules, not both or neither")
    if options["rules"] is None:
        if options["instrument_module"]:
            raise CommandError(
                "--instrument-module goes with --rules (a saved grouping has its own)"
            )
        grouping = DataGrouping.objects.filter(name=options["grouping"]).first()
        if grouping is None:
            known = list(DataGrouping.objects.order_by("name").values_list("name", flat=True)[:20])
            raise CommandError(
                f"no data grouping named {options['grouping']!r}; known: "
                f"{', '.join(known) if known else '(none)'}"
            )
        return grouping
    try:
        rules = json.loads(options["rules"])
    except json.JSONDecodeError as exc:
        raise CommandError(f"--rules is not JSON: {exc}") from None
    module = None
    if options["instrument_module"]:
        instrument, _, name = options["instrument_module"].partition("/")
        module = InstrumentModule.objects.filter(instrument__name=instrument, name=name).first()
        if module is None:
            raise CommandError(
                f"no instrument module {options['instrument_module']!r}: give INSTRUMENT/MODULE "
                "as the admin lists them, e.g. CHAI/LFA"
            )
    # Never saved: preview only reads filter_rules and instrument_module.
    return DataGrouping(name="", filter_rules=rules, instrument_module=module)
