"""The demo reduction program (pipelines/demo/reduction): calibrate per scan, combine per source,
run as the workflow runs it (a separate process following the /workflow contract) on files the
observation simulator wrote, and refusing corrupted, missing or malformed input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.demo.reduction.program import main
from pipelines.models import RawDataFile

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _run(mode: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    """The program as a job runs it: its own process, the contract's variables, and a check
    that it never imported Django."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "WORKFLOW_MANIFEST": str(run_dir / "config" / "manifest.json"),
        "WORKFLOW_INPUT_DIR": str(run_dir / "input"),
        "WORKFLOW_OUTPUT_DIR": str(run_dir / "output"),
    }
    code = (
        "import sys; from pipelines.demo.reduction.program import main; rc = main(sys.argv[1:]); "
        "assert 'django' not in sys.modules, 'the demo reduction imported Django'; sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, mode],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    (run_dir / "config").mkdir(parents=True, exist_ok=True)
    (run_dir / "config" / "manifest.json").write_text(json.dumps(manifest))


def _stage_scan(run_dir: Path, files: list[RawDataFile]) -> list[dict[str, Any]]:
    """Copy a scan's raw files into run_dir/input as staging would, and list them as the
    workflow-manager's manifest does (path relative to input/, checksum as registered)."""
    entries = []
    for raw in files:
        target = run_dir / "input" / raw.relative_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(raw.source_location.root_path) / raw.relative_path, target)
        entries.append(
            {
                "path": raw.relative_path,
                "checksum": raw.checksum,
                "checksum_algorithm": raw.checksum_algorithm,
                "size": raw.size,
                "raw_data_file_id": str(raw.pk),
                "instrument": raw.instrument_module.instrument.name,
                "module": raw.instrument_module.name,
            }
        )
    return entries


@pytest.fixture
def simulated_scans(db: None) -> dict[str, list[RawDataFile]]:
    from pipelines.demo import demo_facility_load, demo_observations_simulate

    demo_facility_load()
    demo_observations_simulate(count=2, files_per_module=3)
    scans: dict[str, list[RawDataFile]] = {}
    files = RawDataFile.objects.select_related(
        "source_location", "instrument_module__instrument"
    ).order_by("relative_path")
    for raw in files:
        scans.setdefault(str(raw.executed_obs_unit_id), []).append(raw)
    assert len(scans) == 2
    return scans


def test_calibrate_then_combine_reduces_simulated_scans_to_products(
    simulated_scans: dict[str, list[RawDataFile]], tmp_path: Path
) -> None:
    upstream = []
    calibrated_rms: dict[str, list[float]] = {}
    for number, (scan, files) in enumerate(sorted(simulated_scans.items()), start=1):
        run_dir = tmp_path / f"calibrate-{number}"
        inputs = _stage_scan(run_dir, files)
        _write_manifest(
            run_dir,
            {
                "schema": 1,
                "run_id": number,
                "step": "calibrate",
                "sub_group_key": f"executed_obs_unit={scan}",
                "parameters": {"channels": 256, "calibration_mode": "hot_cold"},
                "inputs": inputs,
            },
        )

        result = _run("calibrate", run_dir)

        assert result.returncode == 0, result.stderr
        output = run_dir / "output"
        modules = {raw.instrument_module.name for raw in files}
        science = sorted((output / "science").glob("calibrated_*.csv"))
        assert len(science) == len(modules)
        metrics = json.loads((output / "qa" / "metrics.json").read_text())
        assert metrics["mode"] == "calibrate"
        assert metrics["inputs"] == len(files)
        assert metrics["bytes_read"] == sum(raw.size for raw in files)
        assert set(metrics["modules"]) == modules
        for module, values in metrics["modules"].items():
            # 64 KiB per file, 3 files: 384 dumps of 256 channels of uniform counts.
            assert values["dumps"] == 3 * 65536 // 2 // 256
            assert math.isfinite(values["rms_k"]) and values["rms_k"] > 0
            # Pure noise: the spectrum's scatter is the noise of the mean, nothing more.
            assert values["noise_consistent"], values
            calibrated_rms.setdefault(module, []).append(values["rms_k"])
        stats = json.loads((output / "statistics" / "summary.json").read_text())
        assert set(stats["modules"]) == modules
        assert all(m["good_channels"] > 200 for m in stats["modules"].values())
        width, height = _png_size(output / "plots" / "calibrated_spectra.png")
        assert width > 100 and height > 100
        log = (output / "logs" / "reduction.log").read_text()
        assert f"verified {len(files)} input(s)" in log
        assert "calibration_mode" in log, "unused parameters are logged"
        for path in science:
            relative = f"calibrate-{number}/calibrate/science/{path.name}"
            staged = tmp_path / "combine" / "input" / relative
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staged)
            upstream.append(
                {
                    "path": relative,
                    "checksum": _sha256(path),
                    "checksum_algorithm": "sha256",
                    "product_type": "INTERMEDIATE",
                    "step": "calibrate",
                    "run_id": number,
                }
            )

    combine_dir = tmp_path / "combine"
    _write_manifest(
        combine_dir,
        {"run_id": 3, "step": "combine", "sub_group_key": "all", "upstream_products": upstream},
    )

    result = _run("combine", combine_dir)

    assert result.returncode == 0, result.stderr
    output = combine_dir / "output"
    metrics = json.loads((output / "qa" / "metrics.json").read_text())
    assert metrics["mode"] == "combine"
    assert metrics["inputs"] == len(upstream)
    for module, values in metrics["modules"].items():
        assert (output / "science" / f"combined_{module.replace(' ', '_')}.csv").exists()
        assert values["inputs"] == len(calibrated_rms[module])
        if values["inputs"] > 1:
            # Two independent noise spectra average down by about sqrt(2).
            assert values["rms_k"] < min(calibrated_rms[module])
            assert 0.7 < values["rms_over_expected"] < 1.4, values
    _png_size(output / "plots" / "combined_spectra.png")
    json.loads((output / "statistics" / "summary.json").read_text())
    assert "combined" in (output / "logs" / "reduction.log").read_text()


def test_a_corrupted_staged_input_stops_the_run_naming_the_file(
    simulated_scans: dict[str, list[RawDataFile]], tmp_path: Path
) -> None:
    files = next(iter(simulated_scans.values()))
    run_dir = tmp_path / "run"
    inputs = _stage_scan(run_dir, files)
    _write_manifest(run_dir, {"inputs": inputs})
    victim = run_dir / "input" / files[1].relative_path
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))

    result = _run("calibrate", run_dir)

    assert result.returncode == 3
    assert f"corrupted input {files[1].relative_path}" in result.stderr
    assert "expected" in result.stderr and "found" in result.stderr
    assert not list((run_dir / "output" / "science").iterdir()), "nothing reduced from bad data"
    assert not (run_dir / "output" / "qa" / "metrics.json").exists()
    assert "corrupted input" in (run_dir / "output" / "logs" / "reduction.log").read_text()


# --- bad input, in-process (the program's main() is plain Python) --------------------------------


def _synthetic_run(tmp_path: Path, *, files: int = 2, size: int = 8192) -> tuple[Path, list[dict]]:
    entries = []
    for number in range(files):
        relative = f"scan/lfa/lfa_{number:04d}.fits"
        path = tmp_path / "input" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random.Random(number).randbytes(size))
        entries.append(
            {
                "path": relative,
                "checksum": _sha256(path),
                "checksum_algorithm": "sha256",
                "module": "LFA",
                "instrument": "CHAI",
            }
        )
    return tmp_path, entries


def _main(tmp_path: Path, mode: str = "calibrate") -> int:
    return main(
        [
            mode,
            "--manifest",
            str(tmp_path / "config" / "manifest.json"),
            "--input-dir",
            str(tmp_path / "input"),
            "--output-dir",
            str(tmp_path / "output"),
        ]
    )


def test_a_missing_input_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, entries = _synthetic_run(tmp_path)
    (run_dir / "input" / entries[0]["path"]).unlink()
    _write_manifest(run_dir, {"inputs": entries})

    assert _main(run_dir) == 3
    assert f"missing input {entries[0]['path']}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "mode", "message"),
    [
        (lambda m: m.update(inputs=[]), "calibrate", "lists no inputs"),
        (lambda m: m.update(upstream_products=[]), "combine", "no upstream science products"),
        (lambda m: m["inputs"][0].pop("checksum"), "calibrate", "inputs[0] lacks checksum"),
        (lambda m: m["inputs"][0].update(path="../../etc/passwd"), "calibrate", "leaves"),
        (lambda m: m["inputs"][0].update(checksum_algorithm="md5"), "calibrate", "'md5'"),
        (lambda m: m.update(parameters={"channels": "many"}), "calibrate", "'channels'"),
        (lambda m: m.update(parameters={"baseline_order": 99}), "calibrate", "'baseline_order'"),
        (lambda m: m.update(schema=2), "calibrate", "schema 2"),
        (lambda m: m.update(parameters={"weighting": "median"}), "combine", "'weighting'"),
    ],
)
def test_a_malformed_manifest_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, mode: str, message: str
) -> None:
    run_dir, entries = _synthetic_run(tmp_path)
    manifest: dict[str, Any] = {"inputs": entries, "parameters": {}}
    change(manifest)
    _write_manifest(run_dir, manifest)

    assert _main(run_dir, mode) == 2
    assert message in capsys.readouterr().err
    assert not list((run_dir / "output" / "science").iterdir())


def test_a_file_shorter_than_one_dump_is_a_data_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, entries = _synthetic_run(tmp_path, files=1, size=100)
    _write_manifest(run_dir, {"inputs": entries})

    assert _main(run_dir) == 4
    assert "no complete dump of 256 channels" in capsys.readouterr().err


def test_without_a_manifest_or_output_the_program_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WORKFLOW_MANIFEST", "WORKFLOW_INPUT_DIR", "WORKFLOW_OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)

    assert main(["calibrate"]) == 2
    assert "$WORKFLOW_MANIFEST is not set" in capsys.readouterr().err

    assert _main(tmp_path) == 2
    assert "does not exist" in capsys.readouterr().err


def test_xxh3_checksums_are_verified_too(tmp_path: Path) -> None:
    import xxhash

    run_dir, entries = _synthetic_run(tmp_path)
    for entry in entries:
        data = (run_dir / "input" / entry["path"]).read_bytes()
        entry.update(checksum=xxhash.xxh3_128(data).hexdigest(), checksum_algorithm="xxh3_128")
    _write_manifest(run_dir, {"inputs": entries})

    assert _main(run_dir) == 0
    metrics = json.loads((run_dir / "output" / "qa" / "metrics.json").read_text())
    assert metrics["modules"]["LFA"]["dumps"] == 2 * 8192 // 2 // 256


def test_channels_with_abnormal_scatter_and_spikes_are_flagged(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    counts = rng.integers(30000, 35000, size=(200, 256), dtype=np.uint16)
    counts[:, 10] = np.where(np.arange(200) % 2, 0, 65535)  # a channel that jumps rail to rail
    counts[:, 20] = 32768  # a dead channel: no scatter at all
    counts[:, 100] += 2000  # a spike: normal scatter, far too bright
    path = tmp_path / "input" / "scan" / "lfa_0000.fits"
    path.parent.mkdir(parents=True)
    path.write_bytes(counts.astype("<u2").tobytes())
    entry = {
        "path": "scan/lfa_0000.fits",
        "checksum": _sha256(path),
        "checksum_algorithm": "sha256",
        "module": "LFA",
    }
    _write_manifest(tmp_path, {"inputs": [entry], "parameters": {"baseline_order": 0}})

    assert _main(tmp_path) == 0
    metrics = json.loads((tmp_path / "output" / "qa" / "metrics.json").read_text())
    assert metrics["modules"]["LFA"]["flagged_channels"] == [10, 20]

    parameters = {"baseline_order": 0, "despike_sigma": 5.0}
    _write_manifest(tmp_path, {"inputs": [entry], "parameters": parameters})
    assert _main(tmp_path) == 0
    metrics = json.loads((tmp_path / "output" / "qa" / "metrics.json").read_text())
    assert metrics["modules"]["LFA"]["flagged_channels"] == [10, 20, 100]
    rows = (tmp_path / "output" / "science" / "calibrated_LFA.csv").read_text().splitlines()
    assert rows[-256 + 10].endswith(",1") and rows[-256 + 11].endswith(",0")


def _combine_manifest(tmp_path: Path, spectra: dict[str, str]) -> list[dict[str, Any]]:
    entries = []
    for name, text in spectra.items():
        relative = f"products/calibrate/{name}/science/calibrated_LFA.csv"
        path = tmp_path / "input" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        entries.append(
            {
                "path": relative,
                "checksum": _sha256(path),
                "checksum_algorithm": "sha256",
                "product_type": "INTERMEDIATE",
            }
        )
    return entries


def _spectrum_text(channels: int, noise: float = 1.0) -> str:
    rows = [f"{c},{(-1) ** c * noise:.3f},{noise},0" for c in range(channels)]
    return "# module: LFA\n# dumps: 10\nchannel,intensity_k,noise_k,flagged\n" + "\n".join(rows)


def test_combine_refuses_spectra_with_different_channel_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _combine_manifest(tmp_path, {"1": _spectrum_text(256), "2": _spectrum_text(128)})
    _write_manifest(tmp_path, {"upstream_products": entries})

    assert _main(tmp_path, "combine") == 4
    assert "different channel counts" in capsys.readouterr().err


def test_combine_weights_by_inverse_variance_and_names_a_corrupted_product(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _combine_manifest(
        tmp_path, {"1": _spectrum_text(64, noise=1.0), "2": _spectrum_text(64, noise=3.0)}
    )
    _write_manifest(tmp_path, {"upstream_products": entries})

    assert _main(tmp_path, "combine") == 0
    metrics = json.loads((tmp_path / "output" / "qa" / "metrics.json").read_text())
    # 1/sqrt(1/1 + 1/9): the noisier input counts nine times less.
    assert metrics["modules"]["LFA"]["median_noise_k"] == pytest.approx(0.9487, abs=1e-3)

    _write_manifest(
        tmp_path, {"upstream_products": entries, "parameters": {"weighting": "uniform"}}
    )
    assert _main(tmp_path, "combine") == 0
    metrics = json.loads((tmp_path / "output" / "qa" / "metrics.json").read_text())
    # sqrt(1 + 9) / 2: equal weights let the noisier input through.
    assert metrics["modules"]["LFA"]["median_noise_k"] == pytest.approx(1.5811, abs=1e-3)

    (tmp_path / "input" / entries[1]["path"]).write_text(_spectrum_text(64, noise=0.1))
    assert _main(tmp_path, "combine") == 3
    assert f"corrupted input {entries[1]['path']}" in capsys.readouterr().err


def test_the_local_backend_runs_the_demo_reduction_under_the_contract(tmp_path: Path) -> None:
    # The three pieces together, as the workflow-manager uses them: run layout and manifest,
    # the command for runtime "none", a detached job on the local backend.
    from pipelines.backends.base import JobSpec
    from pipelines.backends.local import LocalBackend
    from pipelines.containers import build_command, make_run_dirs, run_layout, write_manifest

    layout = run_layout(tmp_path / "processing", 7, "source=NGC253", 41, 1)
    make_run_dirs(layout, step_name="calibrate")
    _staged, entries = _synthetic_run(layout.run_dir, files=2, size=65536)
    write_manifest(layout, {"run_id": 41, "step": "calibrate", "inputs": entries})
    argv, env = build_command(
        runtime="none",
        image="",
        sif_path="",
        argv=[sys.executable, "-m", "pipelines.demo.reduction", "calibrate"],
        layout=layout,
        step_name="calibrate",
        final_step=False,
    )
    backend = LocalBackend(state_dir=tmp_path / "jobs")

    job_id = backend.submit(JobSpec(name="run-41-1", command=argv, run_dir=layout.run_dir, env=env))

    deadline = time.monotonic() + 120
    while not (status := backend.get_status([job_id])[job_id]).is_finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status.state == "completed", backend.get_logs(job_id)
    produced = layout.workspace / "calibrate"
    assert (produced / "science" / "calibrated_LFA.csv").exists()
    _png_size(produced / "plots" / "calibrated_spectra.png")
    assert json.loads((produced / "qa" / "metrics.json").read_text())["run_id"] == 41
    assert "verified 2 input(s)" in backend.get_logs(job_id)
