"""manage.py reduction_config and the read-only admin."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from reduction.instruments import get_instrument
from reduction.models import ParameterSet, PropertyModification
from reduction.services import reduction_config_current, reduction_config_update

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("reduction_config", *args, stdout=out)
    return out.getvalue()


def test_set_parses_json_and_text_and_reports_path_and_checksum(cncs_scientist: Any) -> None:
    out = run(
        "set", "cncs", "e_min=-0.1", "do_tib=false", "mask=Bank=36-50", "--user", "cncs_scientist"
    )
    ps = ParameterSet.objects.get()
    assert ps.values["e_min"] == -0.1 and ps.values["do_tib"] is False
    assert ps.values["mask"] == [{"bank": "36-50"}]
    assert ps.author == cncs_scientist and ps.comment == "manage.py reduction_config set"
    assert (
        f"sha256 {ps.script_checksum}" in out and str(get_instrument("cncs").script_path()) in out
    )


def test_set_rejects_unknown_keys_and_bad_values_and_changes_nothing() -> None:
    with pytest.raises(CommandError, match="unknown parameter\\(s\\): colour"):
        run("set", "cncs", "colour=blue")
    with pytest.raises(CommandError, match="e_min: Enter a number"):
        run("set", "cncs", "e_min=abc")
    with pytest.raises(CommandError, match="unknown reduction instrument 'lrs'"):
        run("show", "lrs")
    assert not ParameterSet.objects.exists()


def test_show_render_export_import_round_trip(tmp_path: Path) -> None:
    reduction_config_update(
        "chai", values=reduction_config_current("chai") | {"baseline_order": 2}, user=None
    )
    assert '"baseline_order"' not in run("show", "chai")  # plain listing, not JSON
    assert "baseline_order" in run("show", "chai") and "v1" in run("show", "chai")
    assert "BASELINE_ORDER = 2\n" in run("render", "chai", "--version", "1")

    export = tmp_path / "chai.json"
    run("export", "chai", "--output", str(export))
    document = json.loads(export.read_text())
    assert document["version"] == 1 and document["values"]["baseline_order"] == 2

    document["values"]["baseline_order"] = 4
    export.write_text(json.dumps(document))
    out = run("import", "chai", str(export), "--comment", "backfill")
    ps = ParameterSet.objects.latest_for("chai")
    assert ps is not None and (ps.number, ps.action, ps.comment) == (2, "import", "backfill")
    assert "changed: baseline_order" in out

    document["instrument"] = "cncs"
    export.write_text(json.dumps(document))
    with pytest.raises(CommandError, match="holds 'cncs' values, not 'chai'"):
        run("import", "chai", str(export))


def test_admin_lists_rows_but_allows_no_edits(client: Any, operator: Any) -> None:
    operator.is_staff = operator.is_superuser = True
    operator.save()
    reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_min": -0.1}, user=operator
    )
    client.force_login(operator)
    ps = ParameterSet.objects.get()
    mod = PropertyModification.objects.first()
    assert mod is not None
    for url in (
        "/admin/reduction/parameterset/",
        "/admin/reduction/propertymodification/",
        "/admin/reduction/reductionproperty/",
        f"/admin/reduction/parameterset/{ps.pk}/change/",
    ):
        assert client.get(url).status_code == 200, url
    assert client.get("/admin/reduction/parameterset/add/").status_code == 403
    response = client.post(f"/admin/reduction/propertymodification/{mod.pk}/change/", {})
    assert response.status_code == 403


def snapshot() -> tuple[object, ...]:
    path = get_instrument("chai").script_path()
    return (
        list(ParameterSet.objects.values_list("instrument", "number")),
        PropertyModification.objects.count(),
        path.read_bytes() if path.exists() else None,
    )


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        (
            "baseline_order=" + "9" * 5000,
            "baseline_order: 99999999999999999999… is out of range (at least 0 and at most 5)",
        ),
        ("flag_pixels=" + "9" * 5000, "flag_pixels: Ensure this value has at most 2000"),
        ("baseline_order=" + "[" * 100_000, "baseline_order: Enter a whole number"),
        ("baseline_order=true", "baseline_order: expected a number, got true/false"),
        ("reduce_lfa=1", "reduce_lfa: expected true/false, got int"),
        ("tsys_max_k=NaN", "tsys_max_k: Enter a number"),
        ("line_window_kms=[1, 2, 3]", "line_window_kms: expected 2 numbers, got 3"),
        ("baseline_order", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
    ],
)
def test_set_refuses_malformed_values_with_a_clear_error(assignment: str, message: str) -> None:
    reduction_config_update("chai", values=reduction_config_current("chai"), user=None)
    before = snapshot()
    with pytest.raises(CommandError) as info:
        run("set", "chai", assignment)
    assert message in str(info.value)
    assert snapshot() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"values": ', "is not a JSON export: Expecting value"),
        (b"\xff\xfe\x00 not text", "is not a JSON export: 'utf-8' codec can't decode"),
        (b'{"values": {"baseline_order": 1' + b"0" * 4400 + b"}}", "is not a JSON export: Exceeds"),
        (b"[" * 100_000, "is not a JSON export: nested too deeply"),
        (b"[1, 2]", 'expected {"values": {...}}'),
        (b'{"values": [1]}', 'expected {"values": {...}}'),
        (b'{"instrument": "cncs", "values": {}}', "holds 'cncs' values, not 'chai'"),
        (b'{"values": {}}', "reduce_lfa: missing"),
    ],
)
def test_import_refuses_malformed_files_with_a_clear_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    reduction_config_update("chai", values=reduction_config_current("chai"), user=None)
    before = snapshot()
    document = tmp_path / "bad.json"
    document.write_bytes(content)
    with pytest.raises(CommandError) as info:
        run("import", "chai", str(document))
    assert message in str(info.value)
    assert snapshot() == before


def test_import_refuses_unknown_and_wrongly_typed_keys_by_name(tmp_path: Path) -> None:
    values = reduction_config_current("chai")
    document = tmp_path / "chai.json"
    for change, message in (
        ({"colour": "blue"}, "colour: unknown parameter"),
        ({"flag_pixels": [1, 2]}, "flag_pixels: expected text, got a list"),
        ({"vanadium": "/x/../y"}, "vanadium: unknown parameter"),
    ):
        document.write_text(json.dumps({"instrument": "chai", "values": values | change}))
        with pytest.raises(CommandError, match=message):
            run("import", "chai", str(document))
    assert not ParameterSet.objects.exists()


def test_unreadable_import_and_unwritable_export_are_command_errors(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"cannot read .*missing\.json: No such file"):
        run("import", "chai", str(tmp_path / "missing.json"))
    with pytest.raises(CommandError, match=r"cannot read .*: Is a directory"):
        run("import", "chai", str(tmp_path))
    with pytest.raises(CommandError, match=r"cannot write .*nowhere/x\.json: No such file"):
        run("export", "chai", "--output", str(tmp_path / "nowhere/x.json"))


@pytest.mark.parametrize(
    ("subcommand", "expected"),
    [
        ("show", ["instrument key, one of: chai, primecam, cncs", "--version N", "version number"]),
        ("set", ["instrument key, one of:", "VALUE is read as JSON", "--comment COMMENT", "why"]),
        ("render", ["instrument key, one of:", "--version N", "default: the latest saved"]),
        ("export", ["instrument key, one of:", "--version N", "--output OUTPUT"]),
        ("import", ["instrument key, one of:", "a file written by 'export'", "--comment COMMENT"]),
    ],
)
def test_every_subcommand_documents_its_arguments(
    capsys: pytest.CaptureFixture[str], subcommand: str, expected: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        call_command("reduction_config", subcommand, "--help")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for phrase in expected:
        assert phrase in text, phrase
    if subcommand in ("set", "import"):
        assert "kept with the new version" in text and "recorded as the author" in text
