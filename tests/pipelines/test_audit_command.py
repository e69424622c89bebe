"""``manage.py audit_storage``: bad input answers with an error naming it and changes nothing;
a run prints a summary (or JSON) and exits 1 when it marked lost copies."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from pipelines.models import DarkFile, DataLocation, PhysicalCopy, StateEvent
from tests import factories as f

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("audit_storage", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def buffer(tmp_path: Path) -> DataLocation:
    root = tmp_path / "buffer"
    (root / "packages").mkdir(parents=True)
    (root / "packages" / "known.tar").write_bytes(b"k")
    (root / "stray.dat").write_bytes(b"s" * 10)
    location: DataLocation = f.DataLocationFactory(
        site=f.SiteFactory(short_name="obs"), name="buffer", root_path=str(root)
    )
    f.PhysicalCopyFactory(
        raw_data_package=f.RawDataPackageFactory(relative_path="packages/known.tar"),
        location=location,
    )
    return location


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("buffer", "location 'buffer': write SITE:LOCATION"),
        ("obs:", "location 'obs:': write SITE:LOCATION"),
        (":buffer", "location ':buffer': write SITE:LOCATION"),
        ("obs:nowhere", "location 'obs:nowhere': no such location"),
        ("nosite:buffer", "location 'nosite:buffer': no such location"),
    ],
)
def test_a_bad_location_is_named_in_the_error_and_nothing_changes(
    buffer: DataLocation, argument: str, message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        run(argument)
    assert not DarkFile.objects.exists()
    assert not StateEvent.objects.filter(field="integrity").exists()


def test_a_missing_argument_is_an_error() -> None:
    with pytest.raises(CommandError, match="location"):
        run()


def test_a_tape_location_cannot_be_audited(buffer: DataLocation) -> None:
    f.DataLocationFactory(
        site=buffer.site, name="tape", storage_type=DataLocation.StorageType.TAPE, root_path=""
    )
    with pytest.raises(CommandError, match="obs:tape: Tape storage cannot be audited"):
        run("obs:tape")


def test_an_unmounted_location_stops_with_an_error_and_changes_nothing(
    buffer: DataLocation, tmp_path: Path
) -> None:
    DataLocation.objects.filter(pk=buffer.pk).update(root_path=str(tmp_path / "unmounted"))
    with pytest.raises(CommandError, match=r"audit of obs:buffer stopped: .*not mounted"):
        run("obs:buffer")
    assert not DarkFile.objects.exists()
    assert not PhysicalCopy.objects.filter(integrity=PhysicalCopy.Integrity.MISSING).exists()


def test_an_audit_prints_what_it_found_and_a_summary(buffer: DataLocation) -> None:
    out, err = run("obs:buffer")
    assert "files seen        2 (11 bytes)" in out
    assert "dark, new         1" in out
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("obs:buffer: 2 file(s) seen, 1 known, 1 dark (1 new), 0 no longer dark, 0 lost")
    )
    assert "audit obs:buffer: 2 files" in err  # progress goes to stderr
    assert DarkFile.objects.get().relative_path == "stray.dat"


def test_json_output_is_the_report(buffer: DataLocation) -> None:
    out, _err = run("obs:buffer", "--json")
    data = json.loads(out)
    assert data["location"] == "obs:buffer"
    counts = (data["files_seen"], data["known"], data["dark_new"], data["lost_marked"])
    assert counts == (2, 1, 1, 0)
    assert data["finished_at"] >= data["started_at"]


def test_the_exit_status_is_1_when_lost_copies_were_marked(buffer: DataLocation) -> None:
    f.PhysicalCopyFactory(
        raw_data_package=f.RawDataPackageFactory(relative_path="packages/gone.tar"),
        location=buffer,
    )
    with pytest.raises(SystemExit) as exit_info:
        run("obs:buffer")
    assert exit_info.value.code == 1
    assert PhysicalCopy.objects.filter(integrity=PhysicalCopy.Integrity.MISSING).count() == 1
