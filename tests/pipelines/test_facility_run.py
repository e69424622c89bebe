"""``manage.py facility run``: the embedded facility, end to end in a subprocess on the laptop
default (SQLite file, file-system broker), and its answers to bad input."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.subprocesses import manage, python

REPORT = """
import json
from pipelines.models import PhysicalCopy, RawDataFile, RawDataPackage
packages = list(RawDataPackage.objects.values("id", "status", "state", "relative_path",
                                             "checksum", "origin_location__root_path",
                                             "file_count"))
for package in packages:
    package["verified_at"] = sorted(
        PhysicalCopy.objects.filter(raw_data_package_id=package["id"], status="present",
                                    integrity="verified")
        .values_list("location__site__short_name", "location__name"))
print(json.dumps({
    "packages": packages,
    "unpackaged": RawDataFile.objects.filter(raw_data_package__isnull=True).count(),
    "files": RawDataFile.objects.count(),
    "copies": PhysicalCopy.objects.filter(kind="raw_data_package", status="present",
                                          integrity="verified").count(),
    "observatory_live_copies": PhysicalCopy.objects.filter(location__site__short_name="ccat")
                                  .exclude(status="deleted").count(),
}))
"""


@pytest.fixture(scope="module")
def facility(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`manage.py demo --no-serve`, once for this module: set up, simulate two scans, and run
    the data path until idle."""
    var = tmp_path_factory.mktemp("facility") / "var"
    result = manage(var, "demo", "--no-serve", "--count", "2", "--timeout", "150")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Running the data path until idle" in result.stdout
    assert "facility idle after" in result.stdout
    return var


def test_the_demo_archives_every_scan_at_both_archive_sites(facility: Path) -> None:
    state = json.loads(python(facility, REPORT))
    assert state["unpackaged"] == 0 and state["files"] > 0
    assert sum(p["file_count"] for p in state["packages"]) == state["files"]
    for package in state["packages"]:
        assert (package["status"], package["state"]) == ("completed", "archived")
        # Each archive site's buffer and its long-term archive. The observatory's buffer copy
        # was deleted once the package was archived (the demo keeps nothing there: issue 10).
        assert package["verified_at"] == [
            ["cologne", "buffer"],
            ["cologne", "lta"],
            ["us", "buffer"],
            ["us", "lta"],
        ]
        origin = Path(package["origin_location__root_path"])
        assert origin.parts[-2:] == ("ccat", "buffer")
        assert not (origin / package["relative_path"]).exists()
        tar_path = origin.parent.parent / "cologne" / "lta" / package["relative_path"]
        with tarfile.open(tar_path) as tar:
            assert len(tar.getmembers()) == package["file_count"]
    # Deletion (issue 10): the observatory's SOURCE and BUFFER hold no live copy any more.
    assert state["observatory_live_copies"] == 0


def test_facility_run_until_idle_with_nothing_to_do_exits_0_after_one_round(
    facility: Path,
) -> None:
    before = json.loads(python(facility, REPORT))
    result = manage(facility, "facility", "run", "--until-idle", "--timeout", "60", "--tick", "0.5")
    assert result.returncode == 0, result.stderr
    assert "facility idle after 1 round(s)" in result.stdout
    assert "unfinished: none; failed: none" in result.stdout
    assert json.loads(python(facility, REPORT)) == before


def test_facility_run_picks_up_new_scans(facility: Path) -> None:
    python(
        facility,
        "from django.core.management import call_command\n"
        "call_command('simulate_observations', count=3, verbosity=0)\n",
    )
    assert json.loads(python(facility, REPORT))["unpackaged"] > 0
    result = manage(
        facility, "facility", "run", "--until-idle", "--timeout", "120", "--tick", "0.5"
    )
    assert result.returncode == 0, result.stderr + result.stdout
    state = json.loads(python(facility, REPORT))
    assert state["unpackaged"] == 0
    assert all(p["state"] == "archived" for p in state["packages"])


def test_facility_run_with_a_timeout_exits_1_listing_what_is_left(facility: Path) -> None:
    # A claim held under a live lease by some other runner: this one may neither take it over
    # nor call the facility idle.
    python(
        facility,
        """
from datetime import timedelta
from django.utils import timezone
from pipelines.models import RawDataPackage
p = RawDataPackage.objects.order_by("pk").first()
RawDataPackage.objects.create(
    name="held-elsewhere.tar", relative_path="x/held-elsewhere.tar",
    executed_obs_unit=p.executed_obs_unit, instrument_module=p.instrument_module,
    status="scheduled", claim_token="another-runner",
    lease_expires_at=timezone.now() + timedelta(hours=1),
)
""",
    )
    result = manage(facility, "facility", "run", "--until-idle", "--timeout", "2", "--tick", "0.5")

    assert result.returncode == 1, result.stdout
    assert "stopped with work left" in result.stderr
    assert "unfinished: raw_data_package: 1" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "arguments are required"),
        (("frobnicate",), "invalid choice"),
        (("run", "--tick", "0"), "must be above 0"),
        (("run", "--tick", "soon"), "not a number of seconds"),
        (("run", "--timeout", "-5"), "must be above 0"),
        (("run", "--concurrency", "0"), "between 1 and 64"),
        (("run", "--concurrency", "two"), "not a whole number"),
    ],
)
def test_bad_arguments_are_clear_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("facility", *args)
