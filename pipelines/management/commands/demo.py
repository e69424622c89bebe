"""One command from an empty checkout to a running demo: set up, simulate, serve."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.demo import (
    ADMIN_USERNAME,
    DEFAULT_PASSWORD,
    DemoFacility,
    demo_facility_load,
    demo_observations_simulate,
)

Step = tuple[str, Callable[[], None]]


def _between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value!r} must be between {low} and {high}")
        return number

    return parse


class Command(BaseCommand):
    help = (
        "Set up and run the laptop demo: migrate, create the cache table, load the demo "
        "facility, simulate --count scans, then serve the site (ASGI, daphne) on 127.0.0.1. "
        "--no-serve stops after the setup."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-serve", action="store_true", help="stop after the setup")
        parser.add_argument(
            "--port", type=_between(1, 65535), default=8000, help="port to serve on (8000)"
        )
        parser.add_argument(
            "--count", type=_between(0, 100_000), default=3, help="scans to simulate (3)"
        )
        parser.add_argument(
            "--timeout",
            type=_between(1, 7 * 24 * 3600),
            default=600,
            help="seconds the data path may take before the demo gives up (600)",
        )
        parser.add_argument(
            "--password",
            default=None,
            help=(
                "password for new demo users (default: $DEMO_PASSWORD, else "
                f"{DEFAULT_PASSWORD!r}); demo only"
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.options = options
        if not options["no_serve"]:
            self.check_plain_http()
        self.password = options["password"] or os.environ.get("DEMO_PASSWORD") or DEFAULT_PASSWORD
        self.facility: DemoFacility | None = None
        for label, step in self.setup_steps():
            self.stdout.write(self.style.MIGRATE_HEADING(f"==> {label}"))
            step()
        self.print_welcome()
        if not options["no_serve"]:
            self.serve()

    # The setup, in order: the last step runs the data path (workers and managers) until
    # nothing is left to do, so the pages show packaged data when the server starts.
    def setup_steps(self) -> list[Step]:
        return [
            ("Applying migrations", self.migrate),
            ("Creating the cache table", self.create_cache_table),
            ("Loading the demo facility", self.load_facility),
            (f"Simulating {self.options['count']} observations", self.simulate),
            ("Running the data path until idle (workers and managers)", self.run_facility),
        ]

    def migrate(self) -> None:
        call_command("migrate", interactive=False, verbosity=0)

    def create_cache_table(self) -> None:
        # The default cache is a database table when REDIS_URL is unset; a no-op otherwise.
        call_command("createcachetable", verbosity=0)

    def load_facility(self) -> None:
        self.facility = demo_facility_load(password=self.password)
        self.stdout.write(self.facility.summary())

    def simulate(self) -> None:
        result = demo_observations_simulate(count=self.options["count"])
        self.stdout.write(result.summary())

    def run_facility(self) -> None:
        call_command(
            "facility",
            "run",
            "--until-idle",
            "--timeout",
            str(self.options["timeout"]),
            "--tick",
            "1",
            verbosity=self.options["verbosity"],
            stdout=self.stdout._out,
        )

    def print_welcome(self) -> None:
        url = f"http://127.0.0.1:{self.options['port']}/admin/"
        if self.facility is not None and ADMIN_USERNAME in self.facility.passwords_set:
            login = f"user {ADMIN_USERNAME!r}, password {self.password!r} (demo only)"
        else:
            login = (
                f"user {ADMIN_USERNAME!r} with the password it already had "
                "(`manage.py load_demo_facility --reset-passwords` sets the demo password)"
            )
        self.stdout.write(self.style.SUCCESS(f"Demo ready: {url}"))
        self.stdout.write(f"Log in as {login}")
        self.stdout.write(
            "More data: `manage.py simulate_observations --count N`, then "
            "`manage.py facility run --until-idle` (or leave `manage.py facility run` running)."
        )

    def check_plain_http(self) -> None:
        """The demo serves plain HTTP on 127.0.0.1. With the secure settings on (they default
        to on once DJANGO_SECRET_KEY is set and DJANGO_DEBUG is off) every page would redirect
        to https:// and no login cookie would come back, so refuse before setting anything up."""
        if settings.SECURE_SSL_REDIRECT or settings.SESSION_COOKIE_SECURE:
            raise CommandError(
                "the demo serves plain HTTP, but the secure settings are on (HTTPS redirect, "
                "secure cookies; DJANGO_SECURE defaults to on when DJANGO_SECRET_KEY is set and "
                "DJANGO_DEBUG is off). Run it with DJANGO_SECURE=0, or unset DJANGO_SECRET_KEY, "
                "or use --no-serve and serve it behind TLS."
            )

    def serve(self) -> None:
        # WhiteNoise warns at start-up when STATIC_ROOT is missing; the demo serves from the
        # finders, so an empty directory is all it needs.
        Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)
        # With daphne first in INSTALLED_APPS, runserver is daphne's ASGI server (HTTP and
        # websockets). The reloader would run this whole setup a second time in a child.
        call_command("runserver", f"127.0.0.1:{self.options['port']}", use_reloader=False)
