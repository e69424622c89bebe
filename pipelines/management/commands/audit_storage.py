"""``manage.py audit_storage SITE:LOCATION``: compare a location's storage with the database."""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.exceptions import OperationError
from pipelines.models import DataLocation
from pipelines.services.audit import AuditOrderError, AuditReport, audit_storage

AUDITABLE = (DataLocation.StorageType.DISK, DataLocation.StorageType.S3)
# Without a terminal, a progress line every this many chunks (a chunk is 2,000 files).
_PLAIN_PROGRESS_EVERY = 50


class Command(BaseCommand):
    help = (
        "Audit one location's storage against the database: files no live copy accounts for "
        "are recorded as dark files (never deleted), and PRESENT or STAGED copies whose file is "
        "absent (twice: in the listing and on a second look) are marked MISSING, which "
        "schedules their repair. Temporary files of live operations, run workspaces and files "
        "modified after the audit started are left alone. Streams the listing, so memory stays "
        "small for millions of files. Prints progress on stderr and a summary (or --json); "
        "exits with status 1 when it marked lost copies."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("location", help="the location to audit, as SITE:LOCATION")
        parser.add_argument(
            "--json", action="store_true", help="print the report as JSON on stdout"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        location = _location(options["location"])
        if location.storage_type not in (
            DataLocation.StorageType.DISK,
            DataLocation.StorageType.S3,
        ):
            raise CommandError(
                f"{location}: {location.get_storage_type_display()} storage cannot be audited "
                "(disk and S3 can)"
            )
        progress = _Progress(self.stderr, enabled=options["verbosity"] > 0)
        try:
            report = audit_storage(location, progress=progress, actor="manage.py audit_storage")
        except (OperationError, AuditOrderError) as exc:
            progress.end()
            raise CommandError(f"audit of {location} stopped: {exc}") from exc
        progress.end()
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        else:
            self._print(report)
        if report.lost_marked:
            raise SystemExit(1)

    def _print(self, report: AuditReport) -> None:
        took = (report.finished_at or report.started_at) - report.started_at
        lines = [
            f"files seen        {report.files_seen} ({report.bytes_seen} bytes)",
            f"known             {report.known}",
            f"dark, new         {report.dark_new}",
            f"dark, still there {report.dark_still_present} ({report.dark_bytes} bytes dark)",
            f"dark, gone        {report.dark_gone}",
            f"lost, marked      {report.lost_marked}",
            f"lost, reappeared  {report.lost_reappeared} (absent from the listing, there later)",
            f"absent, unmarked  {report.absent_not_marked} (being deleted, already missing, "
            "or newer than the audit)",
            f"skipped           {report.skipped_new} modified after the start, "
            f"{report.skipped_temporary} temporary, {report.skipped_workspace} in run "
            f"workspaces, {report.skipped_unrecordable} unrecordable names",
        ]
        for line in lines:
            self.stdout.write(line)
        for path in report.lost_paths[:20]:
            self.stdout.write(f"  lost: {path}")
        summary = f"{report.summary()} in {took.total_seconds():.1f} s"
        style = self.style.WARNING if report.lost_marked else self.style.SUCCESS
        self.stdout.write(style(summary))


def _location(value: str) -> DataLocation:
    site, _, name = value.partition(":")
    if not site or not name:
        raise CommandError(f"location {value!r}: write SITE:LOCATION, e.g. cologne:buffer")
    location = (
        DataLocation.objects.select_related("site").filter(site__short_name=site, name=name).first()
    )
    if location is None:
        raise CommandError(f"location {value!r}: no such location")
    return location


class _Progress:
    """A line on stderr that follows the audit: rewritten in place on a terminal, printed every
    few chunks otherwise (a log file should not get a line per 2,000 files)."""

    def __init__(self, stream: Any, *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.shown = False

    def __call__(self, report: AuditReport) -> None:
        if not self.enabled:
            return
        line = (
            f"audit {report.location}: {report.files_seen} files, {report.known} known, "
            f"{report.dark} dark, {report.lost_marked} lost"
        )
        if self.tty:
            self.stream.write(f"\r{line}", ending="")
            self.stream.flush()
            self.shown = True
        elif report.chunks % _PLAIN_PROGRESS_EVERY == 1 and report.finished_at is None:
            self.stream.write(line)

    def end(self) -> None:
        if self.shown:
            self.stream.write("")
            self.shown = False
