"""Every operator command of the pipelines app answers ``--help`` with a description of itself
and its options, exits 0 and touches nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command, load_command_class

COMMANDS = sorted(
    path.stem
    for path in (Path(__file__).resolve().parents[2] / "pipelines/management/commands").glob("*.py")
    if not path.stem.startswith("_")
)


def test_the_list_is_not_empty() -> None:
    assert {"why", "deletion_plan", "verify_copies", "audit_storage", "backfill"} <= set(COMMANDS)


@pytest.mark.django_db
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.models import StateEvent

    events = StateEvent.objects.count()
    with pytest.raises(SystemExit) as exit_info:
        call_command(command, "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--help" in out
    # A description, not only the usage line.
    assert load_command_class("pipelines", command).help.strip()
    assert load_command_class("pipelines", command).help.split()[0] in out
    assert StateEvent.objects.count() == events
