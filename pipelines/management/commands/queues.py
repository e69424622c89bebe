"""Print the Celery queues a worker on this host should consume, for ``celery worker -Q``.

    celery -A workflow_site worker -Q "$(python manage.py queues --site cologne)"
    celery -A workflow_site worker -Q "$(python manage.py queues --no-locations --managers)"

Without ``--site``/``--location`` every active location's queues are listed; ``--no-locations``
leaves them out for a worker that only serves the fixed queues.

Queues come from the active Site/DataLocation rows (``pipelines.queues.discover_queues``), so a
new location is served after a worker restart without any code change.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.queues import (
    DEFAULT_QUEUE,
    MANAGERS_QUEUE,
    WORKFLOW_QUEUES,
    QueueNameClash,
    discover_queues,
)


class Command(BaseCommand):
    help = "Print the comma-separated queue names for `celery -A workflow_site worker -Q`."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--site", help="only locations of this site (Site.short_name)")
        parser.add_argument(
            "--location",
            type=int,
            action="append",
            dest="locations",
            metavar="ID",
            help="only this DataLocation id (repeatable)",
        )
        parser.add_argument(
            "--no-locations",
            action="store_true",
            help="leave out the per-location queues (a workflow- or manager-only worker)",
        )
        parser.add_argument(
            "--workflow",
            action="store_true",
            help="add the workflow queues (workflow.staging, workflow.hpc, workflow.results)",
        )
        parser.add_argument(
            "--managers",
            action="store_true",
            help=f"add {MANAGERS_QUEUE} (periodic managers) and {DEFAULT_QUEUE} (everything else)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["no_locations"] and (options["site"] or options["locations"]):
            raise CommandError("--no-locations contradicts --site/--location")
        names: set[str] = set()
        if not options["no_locations"]:
            try:
                names.update(
                    discover_queues(site=options["site"], location_ids=options["locations"])
                )
            except QueueNameClash as exc:
                raise CommandError(str(exc)) from exc
        if options["workflow"]:
            names.update(WORKFLOW_QUEUES)
        if options["managers"]:
            names.update({MANAGERS_QUEUE, DEFAULT_QUEUE})
        if not names:
            scope = f"site {options['site']!r}" if options["site"] else "this selection"
            raise CommandError(
                f"no active location matches {scope}; nothing to consume "
                "(add --workflow or --managers for the fixed queues)"
            )
        self.stdout.write(",".join(sorted(names)))
