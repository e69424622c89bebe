"""``manage.py grouping_preview``: how a grouping's packages split into sub-groups."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.grouping import GROUP_BY_DIMENSIONS, preview
from pipelines.models import DataGrouping


class Command(BaseCommand):
    help = (
        "Count the packages a data grouping selects, per sub-group of the given --group-by keys "
        f"({', '.join(GROUP_BY_DIMENSIONS)} or metadata.<dotted.path>; none: all in one). "
        "One aggregate query; no package is loaded and nothing is changed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("grouping", help="the data grouping's name")
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
        grouping = DataGrouping.objects.filter(name=options["grouping"]).first()
        if grouping is None:
            known = list(DataGrouping.objects.order_by("name").values_list("name", flat=True)[:20])
            raise CommandError(
                f"no data grouping named {options['grouping']!r}; known: "
                f"{', '.join(known) if known else '(none)'}"
            )
        try:
            counts = preview(grouping, list(options["group_by"]))
        except ValidationError as exc:
            raise CommandError(f"{grouping.name}: {'; '.join(exc.messages)}") from None
        if options["json"]:
            self.stdout.write(json.dumps(counts, indent=2))
            return
        total = sum(entry["count"] for entry in counts)
        width = max((len(entry["key"]) for entry in counts), default=0)
        for entry in counts:
            self.stdout.write(f"{entry['key']:<{width}}  {entry['count']:>8}")
        self.stdout.write(
            f"{grouping.name}: {total} package{'s' if total != 1 else ''} in "
            f"{len(counts)} sub-group{'s' if len(counts) != 1 else ''}"
        )
