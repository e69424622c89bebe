"""``manage.py stage``: ask for archived packages to be staged to a PROCESSING location."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from pipelines.exceptions import NonRetryableError
from pipelines.models import DataLocation, RawDataPackage
from pipelines.services.staging import staging_job_create


class Command(BaseCommand):
    help = (
        "Create a staging job that brings archived packages to a PROCESSING location (the "
        "staging manager then copies, verifies and unpacks them there, leaving the files "
        "STAGED). Packages by name or id, or every package of some scans (--scan), or of an "
        "instrument module (--module). Refuses packages that are not archived; --dry-run lists "
        "what would be staged."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("packages", nargs="*", help="package names or ids")
        parser.add_argument("--scan", action="append", default=[], help="executed obs unit id")
        parser.add_argument("--module", help="instrument module name")
        parser.add_argument("--to", required=True, help="destination as SITE:LOCATION")
        parser.add_argument("--dry-run", action="store_true", help="list, change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        destination = _destination(options["to"])
        selection = Q()
        if options["packages"]:
            ids = [int(p) for p in options["packages"] if p.isdigit()]
            names = [p for p in options["packages"] if not p.isdigit()]
            selection |= Q(pk__in=ids) | Q(name__in=names)
            found = RawDataPackage.objects.filter(Q(pk__in=ids) | Q(name__in=names))
            known = {str(p.pk) for p in found} | {p.name for p in found}
            unknown = [p for p in options["packages"] if p not in known]
            if unknown:
                raise CommandError(f"unknown package(s): {', '.join(unknown[:10])}")
        if options["scan"]:
            try:
                scans = [uuid.UUID(value) for value in options["scan"]]
            except ValueError as exc:
                raise CommandError(f"--scan: not a scan id ({exc})") from exc
            selection |= Q(executed_obs_unit_id__in=scans)
        if options["module"]:
            selection &= Q(instrument_module__name=options["module"])
        if not (options["packages"] or options["scan"] or options["module"]):
            raise CommandError("name packages, or select them with --scan or --module")
        packages = list(RawDataPackage.objects.filter(selection).order_by("pk"))
        if not packages:
            raise CommandError("no package matches the selection")
        if options["dry_run"]:
            for package in packages:
                self.stdout.write(f"{package.pk} {package.name} ({package.state})")
            self.stdout.write(f"dry run: {len(packages)} package(s) to {destination}")
            return
        try:
            job = staging_job_create(packages, destination=destination, actor="manage.py stage")
        except NonRetryableError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"staging job {job.pk}: {len(packages)} package(s) to {destination}; the staging "
                "manager picks it up at its next tick"
            )
        )


def _destination(value: str) -> DataLocation:
    site, _, name = value.partition(":")
    if not site or not name:
        raise CommandError(f"--to {value!r}: write SITE:LOCATION, e.g. cologne:processing")
    location = DataLocation.objects.filter(site__short_name=site, name=name).first()
    if location is None:
        raise CommandError(f"--to {value!r}: no such location")
    return location
