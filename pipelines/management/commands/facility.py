"""``manage.py facility run``: the whole facility in one process (see ``pipelines.runner``)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.runner import Round, embedded_worker, run_facility


def _positive_seconds(limit: float) -> Any:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
        if not 0 < number <= limit:
            raise argparse.ArgumentTypeError(f"{value!r} must be above 0 and at most {limit:g}")
        return number

    return parse


def _concurrency(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= number <= 64:
        raise argparse.ArgumentTypeError(f"{value!r} must be between 1 and 64")
    return number


class Command(BaseCommand):
    help = (
        "Run the facility in one process: a worker for every queue of the active locations and "
        "the workflow queues, and every manager ticked every --tick seconds (playing beat). "
        "Uses the configured database and broker (SQLite and the file-system broker by "
        "default). `facility run --until-idle` exits 0 once a whole round of manager ticks found "
        "no work and no operation row is unfinished; with --timeout it exits 1 listing what is "
        "left when time runs out."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="run")
        run = sub.add_parser("run", help="run workers and managers")
        run.add_argument(
            "--until-idle", action="store_true", help="stop (exit 0) once there is no work left"
        )
        run.add_argument(
            "--timeout",
            type=_positive_seconds(7 * 24 * 3600),
            default=None,
            help="stop after this many seconds; exit 1 listing unfinished work",
        )
        run.add_argument(
            "--tick",
            type=_positive_seconds(3600),
            default=2.0,
            help="seconds between rounds of manager ticks (default 2)",
        )
        run.add_argument(
            "--concurrency",
            type=_concurrency,
            default=2,
            help="worker threads (default 2)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from pipelines.queues import DEFAULT_QUEUE, MANAGERS_QUEUE, QueueNameClash, discover_queues

        try:
            queues = [*discover_queues(include_workflow=True), DEFAULT_QUEUE, MANAGERS_QUEUE]
        except QueueNameClash as exc:
            raise CommandError(str(exc)) from exc
        verbosity = options["verbosity"]
        if verbosity < 2:
            # A line per task received and succeeded drowns the round lines; -v 2 shows them.
            logging.getLogger("celery").setLevel(logging.WARNING)
            logging.getLogger("kombu").setLevel(logging.ERROR)
        self.last_line = ""
        stop = threading.Event()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda *_: stop.set())
        if verbosity >= 1:
            self.stdout.write(
                f"serving {len(queues)} queue(s); ticking managers every {options['tick']:g}s"
            )
        try:
            # The worker's heartbeat starts with it (pipelines.tasks, worker_ready).
            with embedded_worker(queues, concurrency=options["concurrency"]):
                result = run_facility(
                    tick=options["tick"],
                    until_idle=options["until_idle"],
                    timeout=options["timeout"],
                    report=lambda r, left: self.report(r, left, verbosity),
                    stop=stop,
                )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if result.idle or not (options["until_idle"] or options["timeout"]):
            self.stdout.write(self.style.SUCCESS(result.summary()))
            return
        raise CommandError(result.summary())

    def report(self, this: Round, left: dict[str, int], verbosity: int) -> None:
        """One line per round whose news differs from the last line printed."""
        if verbosity < 1:
            return
        unfinished = ", ".join(f"{k} {v}" for k, v in left.items()) or "nothing"
        line = f"{this.describe()} | unfinished: {unfinished}"
        if line != self.last_line or verbosity >= 2:
            self.stdout.write(f"[round {this.number}] {line}")
            self.last_line = line
