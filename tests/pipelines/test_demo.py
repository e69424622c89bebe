"""The demo facility loader, the observation simulator and `manage.py demo --no-serve`."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError

import access
from pipelines.demo import DEFAULT_PASSWORD
from pipelines.models import (
    DataLocation,
    DataTransferRoute,
    ExecutedObsUnit,
    Instrument,
    ObsUnit,
    PhysicalCopy,
    RawDataFile,
    Site,
    Source,
    StateEvent,
    Telescope,
)
from pipelines.storage.checksums import checksum_file

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    # The loader hashes four demo passwords per run; the production hasher makes that seconds.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _row_counts() -> dict[str, int]:
    counts = {}
    for model in apps.get_models(include_auto_created=True):
        counts[model._meta.label] = model._default_manager.count()
    return counts


def _run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _snapshot_updated_at() -> dict[str, list[object]]:
    return {
        model._meta.label: list(
            model._default_manager.order_by("pk").values_list("updated_at", flat=True)
        )
        for model in apps.get_app_config("pipelines").get_models()
        if any(f.name == "updated_at" for f in model._meta.concrete_fields)
    }


# --- load_demo_facility ---------------------------------------------------------------------------
def test_loading_twice_changes_nothing() -> None:
    first_output = _run("load_demo_facility")
    counts = _row_counts()
    stamps = _snapshot_updated_at()

    second_output = _run("load_demo_facility")

    assert _row_counts() == counts
    assert _snapshot_updated_at() == stamps
    assert "0 created, 0 updated" in second_output
    assert "0 already present" in first_output
    assert "Password set for" not in second_output


def test_the_observatory_is_modelled_on_ccat() -> None:
    _run("load_demo_facility")

    telescope = Telescope.objects.get(name="FYST")
    assert telescope.observatory.name == "CCAT Observatory"
    assert telescope.observatory.short_name == "ccat"
    assert telescope.altitude_m == 5600
    assert (telescope.latitude_deg, telescope.longitude_deg) == (-22.9856, -67.7404)
    chai = Instrument.objects.get(name="CHAI", telescope=telescope)
    assert chai.instrument_type == "heterodyne"
    lfa, hfa = chai.modules.order_by("-name")
    assert (lfa.name, lfa.pixels, lfa.freq_min_ghz, lfa.freq_max_ghz) == ("LFA", 64, 455, 495)
    assert (hfa.name, hfa.pixels, hfa.freq_min_ghz, hfa.freq_max_ghz) == ("HFA", 64, 800, 820)
    primecam = Instrument.objects.get(name="Prime-Cam")
    assert primecam.instrument_type == "camera"
    assert set(primecam.modules.values_list("name", flat=True)) == {"280 GHz", "350 GHz"}
    assert {kind for kind in Source.objects.values_list("source_type", flat=True)} == {
        "fixed",
        "solar_system",
        "constant_elevation",
    }
    assert Source.objects.filter(name__in=["Orion-KL", "IRC+10216", "NGC253", "M83"]).count() == 4
    orion = ObsUnit.objects.get(name="GEco-OrionKL-CO43-otf")
    assert orion.observing_program.short_name == "GEco"
    assert orion.sub_observing_program is not None
    assert orion.line is not None and orion.line.rest_frequency_ghz == pytest.approx(461.04, 1e-4)
    assert {c.instrument_module.name for c in orion.instrument_module_configurations.all()} == {
        "LFA",
        "HFA",
    }
    # Every obs unit is observable: it has module configurations of an available instrument.
    for obs_unit in ObsUnit.objects.all():
        assert obs_unit.instrument_module_configurations.exists(), obs_unit.name


def test_sites_locations_and_routes(settings: Any) -> None:
    _run("load_demo_facility")

    assert set(Site.objects.values_list("short_name", flat=True)) == {"ccat", "cologne", "us"}
    expected = {
        ("ccat", "chai_raw_data", "source"),
        ("ccat", "primecam_raw_data", "source"),
        ("ccat", "buffer", "buffer"),
        ("cologne", "buffer", "buffer"),
        ("cologne", "lta", "long_term_archive"),
        ("cologne", "processing", "processing"),
        ("us", "buffer", "buffer"),
        ("us", "lta", "long_term_archive"),
        ("us", "processing", "processing"),
    }
    locations = DataLocation.objects.select_related("site")
    assert {(loc.site.short_name, loc.name, loc.location_type) for loc in locations} == expected
    data_root = Path(settings.FACILITY_DATA_ROOT)
    for location in locations:
        assert location.storage_type == "disk"
        assert location.active
        root = data_root / location.site.short_name / location.name
        assert location.root_path == str(root)
        assert root.is_dir()
    routes = {
        (r.origin_site.short_name, r.destination_site.short_name): r
        for r in DataTransferRoute.objects.select_related("origin_site", "destination_site")
    }
    assert set(routes) == {
        ("ccat", "cologne"),
        ("ccat", "us"),
        ("cologne", "us"),
        ("us", "cologne"),
    }
    assert {r.route_type for r in routes.values()} == {"buffered"}
    assert {key for key, r in routes.items() if r.is_primary} == {
        ("ccat", "cologne"),
        ("ccat", "us"),
    }


def test_users_and_groups() -> None:
    _run("load_demo_facility")
    user_model = get_user_model()

    def groups_of(username: str) -> set[str]:
        return set(user_model.objects.get(username=username).groups.values_list("name", flat=True))

    assert set(Group.objects.values_list("name", flat=True)) >= {
        "viewers",
        "scientists",
        "operators",
        "scientists_chai",
        "scientists_primecam",
        "scientists_cncs",
    }
    assert groups_of("viewer") == {"viewers"}
    assert groups_of("scientist") == {"scientists", "scientists_chai"}
    assert groups_of("operator") == {"operators"}
    operator = user_model.objects.get(username="operator")
    admin = user_model.objects.get(username="admin")
    scientist = user_model.objects.get(username="scientist")
    assert operator.is_staff and not operator.is_superuser
    assert admin.is_staff and admin.is_superuser
    assert not scientist.is_staff
    assert access.can_change_instrument(scientist, "chai")
    assert not access.can_change_instrument(scientist, "primecam")
    assert access.is_operator(operator)
    for user in user_model.objects.filter(
        username__in=["viewer", "scientist", "operator", "admin"]
    ):
        assert user.check_password(DEFAULT_PASSWORD)


def test_existing_passwords_are_kept_unless_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    _run("load_demo_facility", "--password", "first-password-1")
    user_model = get_user_model()
    admin = user_model.objects.get(username="admin")
    assert admin.check_password("first-password-1")

    monkeypatch.setenv("DEMO_PASSWORD", "second-password-2")
    _run("load_demo_facility")
    admin.refresh_from_db()
    assert admin.check_password("first-password-1")

    output = _run("load_demo_facility", "--reset-passwords")
    admin.refresh_from_db()
    assert admin.check_password("second-password-2")
    assert "Password set for: viewer, scientist, operator, admin" in output


def test_a_changed_definition_field_is_restored_without_duplicates() -> None:
    _run("load_demo_facility")
    Instrument.objects.filter(name="CHAI").update(available=False)
    counts = _row_counts()

    output = _run("load_demo_facility")

    assert Instrument.objects.get(name="CHAI").available is True
    assert _row_counts() == counts
    assert "0 created, 1 updated" in output


# --- simulate_observations ------------------------------------------------------------------------
def test_simulate_needs_the_demo_facility() -> None:
    with pytest.raises(CommandError, match="load_demo_facility"):
        _run("simulate_observations", "--count", "1")
    assert ExecutedObsUnit.objects.count() == 0


def _assert_files_match_the_database() -> None:
    files = RawDataFile.objects.select_related("source_location", "instrument_module__instrument")
    assert files.exists()
    for raw in files:
        path = Path(raw.source_location.root_path) / raw.relative_path
        assert path.is_file(), path
        assert path.stat().st_size == raw.size
        assert checksum_file(path, raw.checksum_algorithm) == raw.checksum
        expected_location = {"CHAI": "chai_raw_data", "Prime-Cam": "primecam_raw_data"}[
            raw.instrument_module.instrument.name
        ]
        assert raw.source_location.name == expected_location
        # <scan date>/<scan id>/<module>/...
        date, scan_id, module = raw.relative_path.split("/")[:3]
        assert date == f"{raw.executed_obs_unit.start_time:%Y%m%d}"
        assert scan_id == str(raw.executed_obs_unit_id)
        assert module == raw.instrument_module.name.lower().replace(" ", "")
        copy = raw.physical_copies.get()
        assert copy.integrity == PhysicalCopy.Integrity.VERIFIED
        assert copy.verified_checksum == raw.checksum


def test_simulate_is_idempotent_and_extends_to_a_larger_count() -> None:
    _run("load_demo_facility")

    first = _run("simulate_observations", "--count", "2", "--files-per-module", "3")
    counts = _row_counts()
    second = _run("simulate_observations", "--count", "2", "--files-per-module", "3")

    assert _row_counts() == counts
    assert "2 scans created" in first
    assert "0 scans created, 2 already present" in second
    scans = ExecutedObsUnit.objects.all()
    assert scans.count() == 2
    assert all(scan.status == "completed" and scan.end_time for scan in scans)
    # Every scan has files from each module of its obs unit, three per module.
    for scan in scans:
        modules = {c.instrument_module_id for c in scan.instrument_module_configurations.all()}
        assert len(modules) == 2
        assert scan.raw_data_files.count() == 3 * len(modules)
    _assert_files_match_the_database()

    _run("simulate_observations", "--count", "3", "--files-per-module", "3")

    assert ExecutedObsUnit.objects.count() == 3
    assert set(ExecutedObsUnit.objects.values_list("pk", flat=True)) >= {s.pk for s in scans}
    _assert_files_match_the_database()


def test_simulated_files_are_nested_and_sized_as_asked() -> None:
    _run("load_demo_facility")

    _run("simulate_observations", "--count", "1", "--files-per-module", "4", "--file-size", "1000")

    files = RawDataFile.objects.all()
    assert files.count() == 8
    assert set(files.values_list("size", flat=True)) == {1000}
    depths = {raw.relative_path.count("/") for raw in files}
    assert depths == {3, 4}, "module headers at <date>/<scan>/<module>/, data one level deeper"


def test_a_different_seed_makes_different_scans() -> None:
    _run("load_demo_facility")
    _run("simulate_observations", "--count", "1", "--files-per-module", "1")

    _run("simulate_observations", "--count", "1", "--files-per-module", "1", "--seed", "7")

    assert ExecutedObsUnit.objects.count() == 2
    _assert_files_match_the_database()


def test_an_interrupted_scan_is_resumed() -> None:
    _run("load_demo_facility")
    _run("simulate_observations", "--count", "1", "--files-per-module", "2")
    scan = ExecutedObsUnit.objects.get()
    # Simulate a crash after the start and one registration: the rest of the scan is gone.
    kept = scan.raw_data_files.order_by("relative_path").first()
    assert kept is not None
    for raw in scan.raw_data_files.exclude(pk=kept.pk):
        raw.physical_copies.all().delete()
        raw.delete()
    ExecutedObsUnit.objects.filter(pk=scan.pk).update(status="running", end_time=None)

    output = _run("simulate_observations", "--count", "1", "--files-per-module", "2")

    scan.refresh_from_db()
    assert scan.status == "completed"
    assert scan.raw_data_files.count() == 4
    assert "3 files registered" in output and "1 already registered" in output
    _assert_files_match_the_database()


@pytest.mark.parametrize("option", ["--count", "--files-per-module", "--file-size"])
def test_simulate_refuses_a_negative_number_naming_the_option(option: str) -> None:
    _run("load_demo_facility")
    arguments = {"--count": "1", option: "-1"}

    with pytest.raises(CommandError, match=f"^{option} must be 0 or more"):
        _run("simulate_observations", *(x for pair in arguments.items() for x in pair))
    assert ExecutedObsUnit.objects.count() == 0


def test_simulate_summary_uses_singular_for_one() -> None:
    _run("load_demo_facility")

    output = _run("simulate_observations", "--count", "1", "--files-per-module", "0")

    assert "1 scan created, 0 already present; 0 files registered (0 bytes written)" in output


def test_a_rerun_with_more_files_per_module_fills_the_finished_scans() -> None:
    _run("load_demo_facility")
    _run("simulate_observations", "--count", "2", "--files-per-module", "0")
    assert RawDataFile.objects.count() == 0

    more = _run("simulate_observations", "--count", "2", "--files-per-module", "2")
    counts = _row_counts()
    same = _run("simulate_observations", "--count", "2", "--files-per-module", "2")

    # Two scans with two modules each: four modules, two files per module.
    assert "0 scans created, 2 already present; 8 files registered" in more
    assert RawDataFile.objects.count() == 8
    assert all(scan.status == "completed" for scan in ExecutedObsUnit.objects.all())
    _assert_files_match_the_database()
    assert _row_counts() == counts
    assert "0 files registered (0 bytes written), 8 already registered" in same


def test_simulate_reports_progress_per_scan_at_verbosity_2() -> None:
    _run("load_demo_facility")

    output = _run("simulate_observations", "--count", "2", "--files-per-module", "1", "-v", "2")

    assert "[1/2]" in output and "[2/2]" in output and "completed" in output


# --- demo -----------------------------------------------------------------------------------------
def test_demo_no_serve_sets_everything_up(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The data path runs an embedded worker in another thread, which cannot see this test's
    # uncommitted transaction: here it is only checked that the step runs, last; the real run is
    # tested end to end in a subprocess (tests/pipelines/test_facility_run.py).
    from pipelines.management.commands import demo

    ran: list[int] = []
    monkeypatch.setattr(
        demo.Command, "run_facility", lambda self: ran.append(ExecutedObsUnit.objects.count())
    )
    output = _run("demo", "--no-serve", "--count", "2")
    assert ran == [2]

    # Nothing is served with --no-serve, so the demo does not claim to be ready.
    assert "Demo ready" not in output
    assert "runserver 127.0.0.1:8000` serves it at http://127.0.0.1:8000/" in output
    for line in ("viewer     viewer:", "scientist  scientist of CHAI", "operator   operator:"):
        assert line in output
    assert "admin      superuser" in output
    assert f"Password of all four: '{DEFAULT_PASSWORD}'" in output
    assert ExecutedObsUnit.objects.filter(status="completed").count() == 2
    assert get_user_model().objects.filter(username="admin", is_superuser=True).exists()
    # The printed login works on the admin site.
    response = client.post(
        "/admin/login/?next=/admin/", {"username": "admin", "password": DEFAULT_PASSWORD}
    )
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert StateEvent.objects.filter(entity="executed_obs_unit").count() == 4
    _assert_files_match_the_database()

    # A second run is a no-op on the data, no longer claims to know the passwords, and says
    # how to get them.
    counts = _row_counts()
    again = _run("demo", "--no-serve", "--count", "2", "--port", "8123")
    assert _row_counts() == counts
    assert "home page, http://127.0.0.1:8123/)" in again and "8123/admin/" in again
    assert "Password of" not in again
    assert "viewer, scientist, operator, admin already existed" in again
    assert "$DEMO_PASSWORD" in again
    assert "manage.py load_demo_facility --reset-passwords" in again


def test_demo_names_the_password_only_of_the_users_it_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipelines.management.commands import demo

    monkeypatch.setattr(demo.Command, "run_facility", lambda self: None)
    _run("load_demo_facility")
    get_user_model().objects.filter(username="viewer").delete()

    output = _run("demo", "--no-serve", "--count", "0", "--password", "new-pass-3")

    assert "Password of viewer: 'new-pass-3'" in output
    assert "scientist, operator, admin already existed" in output


def test_demo_refuses_to_serve_plain_http_when_the_secure_settings_are_on(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A DJANGO_SECRET_KEY left in the shell turns DJANGO_SECURE on: every page of the HTTP-only
    # demo would redirect to https:// and the secure cookies would never come back. Say so
    # before doing anything, instead of serving a site that cannot be used.
    from pipelines.management.commands import demo

    settings.SECURE_SSL_REDIRECT = True
    settings.SESSION_COOKIE_SECURE = True
    served: list[str] = []
    monkeypatch.setattr(demo, "call_command", lambda *args, **kwargs: served.append(args[0]))

    with pytest.raises(CommandError, match="DJANGO_SECURE=0"):
        call_command("demo", stdout=StringIO())

    assert served == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--count", "-1"), "between 0 and 100000"),
        (("--count", "many"), "not a whole number"),
        (("--timeout", "0"), "between 1 and"),
        (("--port", "70000"), "between 1 and 65535"),
    ],
)
def test_demo_refuses_bad_arguments_before_changing_anything(
    args: tuple[str, ...], message: str
) -> None:
    counts = _row_counts()
    with pytest.raises(CommandError, match=message):
        call_command("demo", "--no-serve", *args, stdout=StringIO())
    assert _row_counts() == counts
