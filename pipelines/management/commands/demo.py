"""One command from an empty checkout to a running demo: set up, simulate, serve."""

from __future__ import annotations

import argparse
import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.demo import (
    DEFAULT_PASSWORD,
    DemoFacility,
    demo_facility_load,
    demo_observations_simulate,
)
from pipelines.demo.facility import USER_ROLES

HOST = "127.0.0.1"

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
        "facility, simulate --count scans, then serve the site (ASGI, daphne) on 127.0.0.1 "
        "--port. Fails before the setup when the port is taken. --no-serve stops after the setup."
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
            self.check_port_free()
        self.password = options["password"] or os.environ.get("DEMO_PASSWORD") or DEFAULT_PASSWORD
        self.facility: DemoFacility | None = None
        for label, step in self.setup_steps():
            self.stdout.write(self.style.MIGRATE_HEADING(f"==> {label}"))
            step()
        if options["no_serve"]:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Demo set up (--no-serve). `python manage.py runserver {HOST}:"
                    f"{options['port']}` serves it at {self.url}"
                )
            )
            self.print_welcome()
        else:
            self.serve()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.options['port']}/"

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
        """The demo accounts with their roles and how to log in; printed after the setup with
        --no-serve, else once the server listens."""
        passwords_set = self.facility.passwords_set if self.facility is not None else []
        self.stdout.write(f"Demo accounts (log in on the home page, {self.url}):")
        for username, role in USER_ROLES.items():
            self.stdout.write(f"  {username:<10} {role}")
        kept = [username for username in USER_ROLES if username not in passwords_set]
        if passwords_set:
            users = "all four" if not kept else ", ".join(passwords_set)
            self.stdout.write(f"Password of {users}: {self.password!r} (demo only)")
        if kept:
            # The loader never overwrites a password it did not just create (the user may have
            # changed it), so this run cannot know it.
            self.stdout.write(
                f"{', '.join(kept)} already existed and kept their password: the one they were "
                f"created with ($DEMO_PASSWORD or --password then, else {DEFAULT_PASSWORD!r}). "
                "To set it again: `python manage.py load_demo_facility --reset-passwords` "
                f"(uses $DEMO_PASSWORD, else {DEFAULT_PASSWORD!r})."
            )
        self.stdout.write(f"Admin site: {self.url}admin/ (operator, admin)")
        self.stdout.write(
            "More data: `manage.py simulate_observations --count N`, then "
            "`manage.py facility run --until-idle` (or leave `manage.py facility run` running)."
        )

    def check_port_free(self) -> None:
        """Fail before the setup when the port cannot be bound: daphne only logs a listen
        failure and returns, so a taken port would otherwise end the demo quietly. A server
        that takes the port between this check and the start is caught by ``serve``."""
        port = self.options["port"]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the server binds: a port left in TIME_WAIT by an earlier demo is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError as exc:
                raise CommandError(self.cannot_serve(exc.strerror or str(exc))) from None

    def cannot_serve(self, reason: str) -> str:
        port = self.options["port"]
        return (
            f"cannot serve the demo on {HOST}:{port}: {reason}. Is another server (or an "
            f"earlier demo) using port {port}? Stop it, or choose another port: "
            "`python manage.py demo --port 8001` or `make demo PORT=8001`."
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
        """Run daphne until it is stopped; say "ready" once it listens. Raises CommandError
        when it could not listen (daphne itself would log the failure and return normally)."""
        # Imported here: importing daphne.server installs Twisted's asyncio reactor, which only
        # the serving process needs.
        from daphne.management.commands.runserver import Command as Runserver

        # WhiteNoise warns at start-up when STATIC_ROOT is missing; the demo serves from the
        # finders, so an empty directory is all it needs.
        Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)
        self.listening = False
        self.listen_failure = "the server stopped before it listened"
        runserver = Runserver()
        runserver.server_cls = functools.partial(_reporting_server_class(), demo=self)
        # The reloader would run this whole setup a second time in a child.
        call_command(
            runserver,
            f"{HOST}:{self.options['port']}",
            use_reloader=False,
            stdout=self.stdout._out,
            stderr=self.stderr._out,
        )
        if not self.listening:
            raise CommandError(self.cannot_serve(self.listen_failure))

    def server_listening(self) -> None:
        self.listening = True
        self.stdout.write(self.style.SUCCESS(f"Demo ready: {self.url}"))
        self.print_welcome()
        self.stdout.write(f"Serving {self.url} until CONTROL-C.")
        self.stdout.flush()

    def server_failed(self, reason: str) -> None:
        self.listen_failure = reason


@functools.cache
def _reporting_server_class() -> type:
    """Daphne's Server, telling the demo command whether it got its port (built on first use;
    see ``Command.serve`` for why daphne is imported late)."""
    from daphne.server import Server

    class ReportingServer(Server):
        def __init__(self, *args: Any, demo: Command, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.demo = demo

        def listen_success(self, port: Any) -> None:
            super().listen_success(port)
            self.demo.server_listening()

        def listen_error(self, failure: Any) -> None:
            self.demo.server_failed(failure.getErrorMessage())
            super().listen_error(failure)

    return ReportingServer
