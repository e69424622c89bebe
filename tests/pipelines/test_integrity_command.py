"""``manage.py verify_copies``: by location, package or all; a summary line; exit status 1 when
it found damage; bad input is a clear error and changes nothing."""

from __future__ import annotations

import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipelines.models import CopyRepair, PhysicalCopy, StateEvent
from pipelines.storage.checksums import checksum_bytes
from tests import factories as f
from tests.subprocesses import ROOT, clean_env

I = PhysicalCopy.Integrity  # noqa: E741
DATA = b"spectra " * 512


def copy_at(location: Any, package: Any, data: bytes = DATA, **kwargs: Any) -> Any:
    copy = f.PhysicalCopyFactory(raw_data_package=package, location=location, **kwargs)
    path = Path(location.root_path) / copy.relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return copy


@pytest.fixture
def facility(tmp_path: Path) -> dict[str, Any]:
    site = f.SiteFactory(short_name="cologne")
    buffer = f.DataLocationFactory(site=site, name="buffer", root_path=str(tmp_path / "buffer"))
    lta = f.DataLocationFactory(
        site=site, name="lta", location_type="long_term_archive", root_path=str(tmp_path / "lta")
    )
    one = f.RawDataPackageFactory(checksum=checksum_bytes(DATA))
    two = f.RawDataPackageFactory(checksum=checksum_bytes(DATA))
    return {
        "buffer": buffer,
        "lta": lta,
        "one": one,
        "two": two,
        "copies": [
            copy_at(buffer, one),
            copy_at(lta, one),
            copy_at(buffer, two),
            copy_at(lta, two),
        ],
    }


def run(*args: str) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("verify_copies", *args, stdout=out, stderr=StringIO(), verbosity=1)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue()
    return 0, out.getvalue()


@pytest.mark.django_db
def test_all_good_copies_are_verified_and_summarised(facility: dict[str, Any]) -> None:
    code, out = run("--all")
    assert code == 0
    assert "4 copies read: 4 verified, 0 mismatch, 0 missing, 0 skipped" in out
    assert set(PhysicalCopy.objects.values_list("integrity", flat=True)) == {I.VERIFIED}


@pytest.mark.django_db
def test_damage_is_listed_repairs_scheduled_and_the_exit_status_is_1(
    facility: dict[str, Any],
) -> None:
    bad, lost = facility["copies"][1], facility["copies"][3]
    path = Path(bad.location.root_path) / bad.relative_path
    path.write_bytes(b"X" + path.read_bytes()[1:])
    (Path(lost.location.root_path) / lost.relative_path).unlink()
    code, out = run("--location", "cologne:lta")
    assert code == 1
    assert f"MISMATCH: copy {bad.pk}" in out and f"MISSING: copy {lost.pk}" in out
    assert "2 copies read: 0 verified, 1 mismatch, 1 missing, 0 skipped" in out
    assert set(CopyRepair.objects.values_list("physical_copy_id", flat=True)) == {bad.pk, lost.pk}
    # The buffer was not part of the selection.
    assert PhysicalCopy.objects.get(pk=facility["copies"][0].pk).integrity == I.UNVERIFIED


@pytest.mark.django_db
def test_a_package_selects_its_copies_and_its_files_copies(facility: dict[str, Any]) -> None:
    one = facility["one"]
    raw = f.RawDataFileFactory(raw_data_package=one, checksum=checksum_bytes(DATA))
    file_copy = f.PhysicalCopyFactory(
        kind=PhysicalCopy.Kind.RAW_DATA_FILE,
        raw_data_package=None,
        raw_data_file=raw,
        location=facility["buffer"],
        relative_path=raw.relative_path,
    )
    target = Path(facility["buffer"].root_path) / raw.relative_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(DATA)
    code, out = run("--package", one.name)
    assert code == 0
    assert "3 copies read: 3 verified" in out
    file_copy.refresh_from_db()
    assert file_copy.integrity == I.VERIFIED


@pytest.mark.django_db
def test_limit_caps_the_copies_read(facility: dict[str, Any]) -> None:
    code, out = run("--all", "--limit", "3")
    assert code == 0
    assert "3 copies read: 3 verified" in out
    assert PhysicalCopy.objects.filter(integrity=I.VERIFIED).count() == 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "one of the arguments --location --package --all is required"),
        (("--all", "--package", "x"), "not allowed with argument"),
        (("--location", "lta"), "write SITE:LOCATION"),
        (("--location", "cologne:nowhere"), "no such location"),
        (("--package", "no_such_package.tar"), "no such package"),
        (("--all", "--limit", "0"), "must be 1 or more"),
        (("--all", "--limit", "many"), "not a whole number"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    facility: dict[str, Any], args: tuple[str, ...], message: str
) -> None:
    events = StateEvent.objects.count()
    with pytest.raises(CommandError, match=message):
        call_command("verify_copies", *args, stdout=StringIO(), stderr=StringIO())
    assert StateEvent.objects.count() == events
    assert set(PhysicalCopy.objects.values_list("integrity", flat=True)) == {I.UNVERIFIED}


def test_the_command_exits_non_zero_on_bad_input_from_the_shell(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "verify_copies", "--location", "nowhere"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(tmp_path / "var"),
    )
    assert result.returncode != 0
    assert "write SITE:LOCATION" in result.stderr
