"""Create (or complete) the demo facility: a CCAT-like observatory, sites, storage and users."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from pipelines.demo import DEFAULT_PASSWORD, demo_facility_load


class Command(BaseCommand):
    help = (
        "Load the demo facility (CCAT Observatory, FYST, CHAI, Prime-Cam, sites ccat/cologne/us "
        "with their disk locations under FACILITY_DATA_ROOT, routes, role groups and the demo "
        "users viewer, scientist, operator, admin). Idempotent: running it again creates nothing "
        "new. The demo password is for a laptop demo only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--password",
            default=None,
            help=(
                "password for newly created demo users (default: $DEMO_PASSWORD, else "
                f"{DEFAULT_PASSWORD!r}); demo only"
            ),
        )
        parser.add_argument(
            "--reset-passwords",
            action="store_true",
            help="also set the password of demo users that already exist",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        password = options["password"] or os.environ.get("DEMO_PASSWORD") or DEFAULT_PASSWORD
        facility = demo_facility_load(password=password, reset_passwords=options["reset_passwords"])
        if facility.passwords_set:
            self.stdout.write(f"Password set for: {', '.join(facility.passwords_set)} (demo only)")
        self.stdout.write(self.style.SUCCESS(facility.summary()))
