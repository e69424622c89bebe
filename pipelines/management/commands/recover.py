"""``manage.py recover``: hand back claims whose worker died, now, instead of at the next beat."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from pipelines.services.operations import abandoned_claim
from pipelines.services.recovery import abandoned_claims, recover_expired_leases


def _batch(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise CommandError(f"--batch-size {value!r} is not a whole number") from None
    if not 1 <= number <= 100_000:
        raise CommandError(f"--batch-size {value!r} must be between 1 and 100000")
    return number


class Command(BaseCommand):
    help = (
        "Recover abandoned claims (expired leases, or claims without a lease unchanged for a "
        "whole lease period) in every operation table, unpacking included, and reduction runs "
        "stuck in staging_data: a claim that never started goes back to pending at no cost, one "
        "that started uses a retry (or fails when none are left). --dry-run lists them and "
        "changes nothing. The same sweep runs every five minutes from beat."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="list, change nothing")
        parser.add_argument(
            "--batch-size", type=_batch, default=500, help="rows per table per run (500)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        batch = options["batch_size"]
        if options["dry_run"]:
            now = timezone.now()
            total = 0
            for key, field, rows in abandoned_claims(now, batch_size=batch):
                for row in rows:
                    reason, _where = abandoned_claim(row, now)
                    state = getattr(row, field)
                    cost = "no retry" if state == "scheduled" else "uses a retry"
                    self.stdout.write(f"{key} {row.pk} ({state}, {cost}): {reason}")
                    total += 1
            self.stdout.write(f"dry run: {total} abandoned claim(s) would be recovered")
            return
        counts = recover_expired_leases(batch_size=batch, actor="manage.py recover")
        moved = {k: v for k, v in counts.items() if v}
        detail = ", ".join(f"{k}: {v}" for k, v in moved.items()) or "nothing to recover"
        self.stdout.write(
            self.style.SUCCESS(f"recovered {sum(moved.values())} claim(s) ({detail})")
        )
