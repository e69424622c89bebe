"""``manage.py deletion_plan``: the dry run lists every copy with its verdict, in text or JSON
lines, changes nothing, and refuses a location it cannot find."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipelines.models import DeletionTask, PhysicalCopy, StateEvent
from tests.pipelines.test_deletion import make_world


def _snapshot() -> tuple[int, ...]:
    return (
        PhysicalCopy.objects.count(),
        StateEvent.objects.count(),
        DeletionTask.objects.count(),
        *sorted(hash(s) for s in PhysicalCopy.objects.values_list("status", flat=True)),
    )


def _plan(*args: str) -> str:
    out = StringIO()
    call_command("deletion_plan", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_the_plan_lists_what_would_go_and_what_stays_by_which_rule(tmp_path: Path) -> None:
    world = make_world(tmp_path)
    before = _snapshot()
    text = _plan()
    lines = text.strip().splitlines()
    assert lines[-1] == ("4 copies: 3 would be deleted, 1 kept (long_term_archive 1)")
    assert any(
        line.startswith(f"DELETE copy {world.buffer_copy.pk} at obs:buffer") for line in lines
    )
    assert any(
        line.startswith(f"KEEP [long_term_archive] copy {world.lta_copy.pk} at arc:lta")
        for line in lines
    )
    assert _snapshot() == before


@pytest.mark.django_db
def test_the_plan_in_json_lines_for_one_location(tmp_path: Path) -> None:
    world = make_world(tmp_path, archived_days_ago=1)
    before = _snapshot()
    rows = [json.loads(line) for line in _plan("--location", "obs:buffer", "--json").splitlines()]
    assert rows[0] == {
        "copy": world.buffer_copy.pk,
        "location": "obs:buffer",
        "kind": "raw_data_package",
        "object": world.package.name,
        "path": world.buffer_copy.relative_path,
        "status": "present",
        "delete": False,
        "rule": "retention",
        "reason": rows[0]["reason"],
    }
    assert rows[0]["reason"].startswith("retention of 7 days at obs:buffer runs until")
    assert rows[-1]["counts"] == {"retention": 1}
    assert rows[-1]["summary"] == "1 copy: 0 would be deleted, 1 kept (retention 1)"
    assert _snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nowhere", "--location 'nowhere': write SITE:LOCATION"),
        ("obs:", "--location 'obs:': write SITE:LOCATION"),
        ("obs:attic", "--location 'obs:attic': no such location"),
        ("mars:buffer", "--location 'mars:buffer': no such location"),
    ],
)
def test_a_bad_location_is_refused_by_name_and_nothing_changes(
    tmp_path: Path, value: str, message: str
) -> None:
    make_world(tmp_path)
    before = _snapshot()
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        call_command("deletion_plan", "--location", value, stdout=StringIO())
    assert _snapshot() == before


@pytest.mark.django_db
def test_an_unknown_option_is_an_error_with_exit_status_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "manage.py", "deletion_plan", "--locaton", "obs:buffer"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --locaton" in result.stderr
