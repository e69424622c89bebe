"""``manage.py verify_copies``: read copies back now and compare their checksums, in this process.

The integrity manager does the same on a schedule through the workers; this command is for an
operator who wants an answer now (after a disk incident, before trusting a location again).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q, QuerySet
from tqdm import tqdm

from pipelines.models import DataLocation, PhysicalCopy, RawDataPackage
from pipelines.services.integrity import (
    MISMATCH,
    MISSING,
    OUTCOMES,
    SKIPPED,
    VERIFIABLE,
    VERIFY_RELATED,
    copy_verify_detail,
)

# Copies read per query: the selection is walked by primary key, never loaded whole.
BATCH = 500


def _limit(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise CommandError(f"--limit {value!r} is not a whole number") from None
    if number < 1:
        raise CommandError(f"--limit {value!r} must be 1 or more")
    return number


def _location(value: str) -> DataLocation:
    site, _, name = value.partition(":")
    if not site or not name:
        raise CommandError(f"--location {value!r}: write SITE:LOCATION, e.g. cologne:lta")
    location = DataLocation.objects.filter(site__short_name=site, name=name).first()
    if location is None:
        raise CommandError(f"--location {value!r}: no such location")
    return location


class Command(BaseCommand):
    help = (
        "Read copies back in full and compare each with its object's registered checksum, now, "
        "in this process (not through the workers): every copy at one location (--location "
        "SITE:LOCATION), every copy of one package and of its files (--package NAME), or every "
        "copy (--all). Copies being deleted or deleted are left out. A good copy is recorded "
        "as verified; a damaged or missing one is marked MISMATCH or MISSING and a repair from "
        "a good copy is scheduled. Prints a summary line; exits with status 1 when it found "
        "damage."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--location", help="every copy at SITE:LOCATION")
        which.add_argument("--package", help="every copy of this raw data package and its files")
        which.add_argument("--all", action="store_true", help="every copy")
        parser.add_argument(
            "--limit", type=_limit, help="verify at most this many copies (in id order)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        copies = self._selection(options)
        total = copies.count()
        if options["limit"] is not None:
            total = min(total, options["limit"])
        counts = dict.fromkeys(OUTCOMES, 0)
        actor = "manage.py verify_copies"
        quiet = options["verbosity"] == 0
        with tqdm(
            total=total, unit="copy", file=sys.stderr, disable=quiet, dynamic_ncols=True
        ) as bar:
            for copy in _walk(copies, total):
                result = copy_verify_detail(copy, actor=actor)
                counts[result.outcome] += 1
                if result.outcome in (MISMATCH, MISSING) or (
                    result.outcome == SKIPPED and options["verbosity"] >= 2
                ):
                    # Clear the bar, print the line through the command's own stdout, redraw.
                    with tqdm.external_write_mode(file=sys.stderr):
                        self.stdout.write(
                            f"{result.outcome.upper()}: copy {copy.pk} at {copy.location} "
                            f"({copy.relative_path}): {result.message}"
                        )
                bar.update(1)
        damaged = counts[MISMATCH] + counts[MISSING]
        summary = ", ".join(f"{counts[outcome]} {outcome}" for outcome in OUTCOMES)
        line = f"{total} cop{'y' if total == 1 else 'ies'} read: {summary}"
        if damaged:
            self.stdout.write(self.style.ERROR(f"{line}; repairs scheduled for damaged copies"))
            self.stdout.flush()
            raise SystemExit(1)
        self.stdout.write(self.style.SUCCESS(line))

    def _selection(self, options: dict[str, Any]) -> QuerySet[PhysicalCopy]:
        copies = PhysicalCopy.objects.filter(status__in=VERIFIABLE)
        if options["location"]:
            return copies.filter(location=_location(options["location"]))
        if options["package"]:
            package = RawDataPackage.objects.filter(name=options["package"]).first()
            if package is None:
                raise CommandError(f"--package {options['package']!r}: no such package")
            return copies.filter(
                Q(raw_data_package=package) | Q(raw_data_file__raw_data_package=package)
            )
        return copies


def _walk(copies: QuerySet[PhysicalCopy], limit: int) -> Iterator[PhysicalCopy]:
    """The selected copies in primary-key order, ``BATCH`` per query, at most ``limit``."""
    last = 0
    given = 0
    while given < limit:
        batch = list(
            copies.filter(pk__gt=last)
            .select_related(*VERIFY_RELATED)
            .order_by("pk")[: min(BATCH, limit - given)]
        )
        if not batch:
            return
        yield from batch
        given += len(batch)
        last = batch[-1].pk
