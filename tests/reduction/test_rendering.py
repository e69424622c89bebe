"""The sandboxed environment and the three shipped templates.

Golden files: tests/reduction/golden/reduce_<KEY>.py.golden is each template rendered with the
instrument's defaults as version 1. After an intended template change, regenerate them with
``UPDATE_GOLDEN=1 .venv/bin/pytest tests/reduction/test_rendering.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reduction.instruments import INSTRUMENTS, get_instrument
from reduction.rendering import ScriptRenderError, python_literal, render_source, script_context

GOLDEN = Path(__file__).parent / "golden"


def render_defaults(key: str, version: int = 1) -> str:
    instrument = get_instrument(key)
    context = script_context(
        instrument.defaults(), instrument_key=key, label=instrument.label, version=version
    )
    return render_source(
        instrument.template_source(), context, template_name=instrument.template_name
    )


@pytest.mark.parametrize("key", list(INSTRUMENTS))
def test_template_renders_its_golden_file(key: str) -> None:
    script = render_defaults(key)
    golden = GOLDEN / f"{get_instrument(key).script_name}.golden"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script, encoding="utf-8")
    assert script == golden.read_text(encoding="utf-8")
    compile(script, golden.name, "exec")


def test_values_become_python_literals_so_strings_cannot_inject_code() -> None:
    hostile = "x'\nimport os; os.system('touch /tmp/pwned')  # \"\"\""
    script = render_source(
        "PATH = {{ path }}\nROWS = {{ rows }}\n",
        {"path": hostile, "rows": [{"bank": "1"}, None, True, 1.5]},
        template_name="t.py.j2",
    )
    namespace: dict[str, object] = {}
    exec(compile(script, "t.py", "exec"), namespace)  # the rendered script only assigns
    assert namespace["PATH"] == hostile
    assert namespace["ROWS"] == [{"bank": "1"}, None, True, 1.5]
    assert script.count("\n") == 2


def test_python_literal_refuses_values_without_a_literal() -> None:
    with pytest.raises(TypeError):
        python_literal(float("nan"))
    with pytest.raises(TypeError):
        python_literal({1, 2})


def test_missing_key_is_an_error_naming_the_key() -> None:
    with pytest.raises(ScriptRenderError, match="'grouping_file' is undefined"):
        render_source("G = {{ grouping_file }}\n", {}, template_name="reduce_X.py.j2")
    with pytest.raises(ScriptRenderError, match="'do_tib' is undefined"):
        render_source("{% if do_tib %}X = 1{% endif %}\n", {}, template_name="reduce_X.py.j2")


def test_template_syntax_error_names_template_and_line() -> None:
    with pytest.raises(ScriptRenderError) as info:
        render_source("A = 1\nB = {{ a \n", {"a": 1}, template_name="reduce_X.py.j2")
    assert info.value.lineno == 2
    assert str(info.value).startswith("reduce_X.py.j2, line 2: template syntax error")


@pytest.mark.parametrize(
    "source",
    [
        "X = {{ ''.__class__.__mro__[1].__subclasses__() }}\n",
        "X = {{ cycler.__init__.__globals__ }}\n",
        "X = {{ path.__class__ }}\n",
        "{% set _ = rows.append(1) %}X = {{ rows }}\n",
    ],
)
def test_sandbox_refuses_python_internals_and_mutation(source: str) -> None:
    with pytest.raises(ScriptRenderError, match=r"sandbox|unsafe|undefined|access"):
        render_source(source, {"path": "/a", "rows": []}, template_name="reduce_X.py.j2")


def test_rendered_output_that_is_not_python_is_refused() -> None:
    with pytest.raises(ScriptRenderError, match="line 1: rendered script is not valid Python"):
        render_source("def broken(:\n", {}, template_name="reduce_X.py.j2")


def test_parameter_set_is_a_reserved_name() -> None:
    with pytest.raises(ScriptRenderError, match="reserved"):
        script_context({"parameter_set": 1}, instrument_key="x", label="X", version=1)


# --- The rendered scripts run and do the reduction -----------------------------------------------


def run_script(script: str, tmp_path: Path, inputs: list[Path]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "reduce.py"
    path.write_text(script)
    return subprocess.run(
        [sys.executable, str(path), *map(str, inputs), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_chai_script_reduces_a_spectrum(tmp_path: Path) -> None:
    lines = ["# module: LFA", "# pixel: 4", "# tsys: 300", "# scan: 42", "velocity_kms,intensity_k"]
    noise = random.Random(1)
    for i in range(-100, 101):
        line = 5.0 if -5 <= i <= 5 else 0.0
        spike = 100.0 if i == 50 else 0.0
        lines.append(f"{float(i)},{0.5 + 0.01 * i + line + spike + noise.gauss(0, 0.05)}")
    spectrum = tmp_path / "scan42_lfa_p4.csv"
    spectrum.write_text("\n".join(lines) + "\n")
    hot = tmp_path / "hot.csv"
    hot.write_text("# module: HFA\n# tsys: 9000\nvelocity_kms,intensity_k\n0,1\n1,1\n")

    result = run_script(render_defaults("chai"), tmp_path, [spectrum, hot])

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out/statistics/summary.json").read_text())
    (reduced,) = summary["spectra"]
    assert summary["parameter_set"]["version"] == 1
    # 11 channels of 5 K inside the window, baseline removed: about 55 K km/s.
    assert reduced["integrated_k_kms"] == pytest.approx(55.0, rel=0.05)
    assert reduced["baseline_rms_k"] < 0.1
    assert reduced["spikes_flagged"] == 1
    rejected = json.loads((tmp_path / "out/qa/rejected.json").read_text())["rejected"]
    assert rejected == [{"file": "hot.csv", "reason": "Tsys 9000.0 K above 3000.0 K"}]
    assert (tmp_path / "out/science/scan42_lfa_p4_reduced.csv").exists()


def test_primecam_script_maps_a_point_source(tmp_path: Path) -> None:
    lines = ["# module: 280 GHz", "# scan: 7", "time_s,ra_offset_arcsec,dec_offset_arcsec,d0,d1,d2"]
    t = 0.0
    for y in range(-60, 61, 6):
        for x in range(-60, 61, 3):
            source = 10.0 if abs(x) <= 6 and abs(y) <= 6 else 0.0
            drift = 0.2 + 0.001 * t  # slow: removed by the high-pass filter
            glitch = 500.0 if (x, y) == (30, 30) else 0.0  # one sample: removed by despiking
            d0, d1, d2 = source + drift, source + drift + glitch, 0.9 * source + drift
            lines.append(f"{t:.2f},{x},{y},{d0},{d1},{d2}")
            t += 0.01
    scan = tmp_path / "scan7.csv"
    scan.write_text("\n".join(lines) + "\n")

    # The three detectors here look at the same spot, so the common mode (their median) would
    # remove the source itself; switch it off for this scan.
    instrument = get_instrument("primecam")
    values = instrument.defaults() | {"common_mode": False}
    script = render_source(
        instrument.template_source(),
        script_context(values, instrument_key="primecam", label="Prime-Cam", version=2),
        template_name=instrument.template_name,
    )
    result = run_script(script, tmp_path, [scan])

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out/statistics/summary.json").read_text())
    (mapped,) = summary["maps"]
    assert mapped["detectors_used"] == 3
    assert 8.0 < mapped["peak_jy"] < 11.0
    cells = (tmp_path / "out/science/scan7_map.csv").read_text().splitlines()
    assert all(float(row.split(",")[2]) < 11.0 for row in cells[1:])
    assert (tmp_path / "out/science/scan7_map.csv").read_text().startswith("x_arcsec,y_arcsec")


def test_cncs_script_masks_normalises_and_bins(tmp_path: Path) -> None:
    vanadium = tmp_path / "van.csv"
    sample = tmp_path / "CNCS_1000.csv"
    van_rows, sample_rows = (
        ["bank,tube,pixel,energy_transfer_mev,counts"],
        [
            "# Ei: 2.0",
            "# run_number: 1000",
            "# SampleTemp: 1.5",
            "# s1: 30",
            "bank,tube,pixel,energy_transfer_mev,counts",
        ],
    )
    for pixel in (1, 50, 128):  # pixels 1 and 128 are masked by default
        van_rows.append(f"1,1,{pixel},0.0,{200 if pixel == 50 else 100}")
        for energy in (-0.3, 0.0, 0.5, 2.5):
            sample_rows.append(f"1,1,{pixel},{energy},10")
    vanadium.write_text("\n".join(van_rows) + "\n")
    sample.write_text("\n".join(sample_rows) + "\n")
    instrument = get_instrument("cncs")
    values = instrument.defaults() | {"vanadium_file": str(vanadium)}
    script = render_source(
        instrument.template_source(),
        script_context(values, instrument_key="cncs", label="CNCS", version=3),
        template_name=instrument.template_name,
    )

    result = run_script(script, tmp_path, [sample])

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out/statistics/CNCS_1000_summary.json").read_text())
    assert summary["pixels_used"] == 1
    assert summary["vanadium_applied"] is True
    assert summary["sample_temperature"] == "1.5"
    assert summary["logs"] == {"s1": "30", "SampleTemp": "1.5"}
    # 2.5 meV is above Emax (0.95 x 2 meV); three bins of 10 counts, efficiency 1 (only pixel).
    assert summary["total_intensity"] == pytest.approx(30.0)
    assert summary["parameter_set"]["version"] == 3
    assert "grouping file" in (tmp_path / "out/logs/reduce_CNCS.log").read_text()
