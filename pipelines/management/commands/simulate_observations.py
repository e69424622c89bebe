"""Simulate telescope scans: write raw files into the demo SOURCE locations and ingest them."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pipelines.demo import DemoNotLoaded, demo_observations_simulate
from pipelines.models import ExecutedObsUnit


class Command(BaseCommand):
    help = (
        "Run N simulated scans of the demo facility: start each, write deterministic raw files "
        "into the instrument's SOURCE location, register them (size and checksum verified) and "
        "finish the scan. Idempotent: the same --count and --seed create nothing new; a larger "
        "--count adds the missing scans. Needs `load_demo_facility` first."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, required=True, help="number of scans")
        parser.add_argument(
            "--seed", type=int, default=0, help="seed for file contents and scan ids (default 0)"
        )
        parser.add_argument(
            "--files-per-module",
            type=int,
            default=3,
            help="raw files each instrument module writes per scan (default 3)",
        )
        parser.add_argument(
            "--file-size",
            type=int,
            default=64 * 1024,
            help="bytes per raw file (default 65536)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # Checked here rather than by an argparse type, so the message names the option.
        for name in ("count", "files_per_module", "file_size"):
            if options[name] < 0:
                option = "--" + name.replace("_", "-")
                raise CommandError(f"{option} must be 0 or more (got {options[name]})")
        count = options["count"]
        verbosity = options["verbosity"]
        # A line per scan when asked, else about twenty progress lines for long runs.
        step = 1 if verbosity >= 2 else max(count // 20, 1)

        def progress(done: int, total: int, scan: ExecutedObsUnit) -> None:
            if verbosity >= 2:
                self.stdout.write(f"[{done}/{total}] {scan.pk} {scan.obs_unit.name} {scan.status}")
            elif verbosity >= 1 and total > 10 and (done % step == 0 or done == total):
                self.stdout.write(f"  {done}/{total} scans ({100 * done // total}%)")

        try:
            result = demo_observations_simulate(
                count=count,
                seed=options["seed"],
                files_per_module=options["files_per_module"],
                file_size=options["file_size"],
                progress=progress,
            )
        except DemoNotLoaded as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(self.style.SUCCESS(result.summary()))
