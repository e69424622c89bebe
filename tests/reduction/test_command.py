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
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=operator)
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
