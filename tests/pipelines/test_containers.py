"""The /workflow contract (pipelines/containers.py): run directories, safe sub-group directory
names, the manifest, and the command of every container runtime (behaviour 28)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.containers import (
    OUTPUT_SUBDIRS,
    RUNTIMES,
    SAFE_NAME_LENGTH,
    RunLayout,
    build_command,
    make_run_dirs,
    run_layout,
    safe_name,
    write_manifest,
)

ROOT = Path("/data/processing")


@pytest.fixture
def layout() -> RunLayout:
    return run_layout(ROOT, 3, "executed_obs_unit=12", 45, 2)


def test_each_attempt_has_its_own_directory_under_the_pipeline_and_sub_group(
    layout: RunLayout,
) -> None:
    assert layout.run_dir == ROOT / "pipelines/3/executed_obs_unit=12/45-2"
    assert layout.input == layout.run_dir / "input"
    assert layout.config == layout.run_dir / "config"
    assert layout.workspace == layout.run_dir / "workspace"
    assert layout.output == layout.run_dir / "output"
    assert layout.logs == layout.run_dir / "logs"
    assert layout.manifest == layout.run_dir / "config/manifest.json"
    retry = run_layout(ROOT, 3, "executed_obs_unit=12", 45, 3)
    assert retry.run_dir != layout.run_dir and retry.run_dir.parent == layout.run_dir.parent


@pytest.mark.parametrize(
    "key", ["all", "executed_obs_unit=12", "source=NGC253;line=CO43", "metadata.band=7"]
)
def test_a_readable_sub_group_key_is_its_own_directory_name(key: str) -> None:
    assert safe_name(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "../",
        "..",
        ".",
        "/",
        "/etc/passwd",
        "../../../../tmp/escape",
        "a/../../b",
        "",
        "source=M 83",
        "line=CO(4-3)",
        ".hidden",
        "nul\x00byte",
        "colon:and,comma",
        "ü" * 300,
        "k" * 5000,
        "source=" + "x" * 200,
    ],
)
def test_an_unsafe_sub_group_key_never_escapes_the_pipeline_directory(
    key: str, tmp_path: Path
) -> None:
    name = safe_name(key)
    layout = run_layout(tmp_path, 1, key, 1, 1)

    assert "/" not in name and "\x00" not in name and ":" not in name and "," not in name
    assert name not in ("", ".", "..") and not name.startswith(".")
    assert len(name) <= SAFE_NAME_LENGTH + 21 and len(name.encode()) < 255
    assert layout.run_dir.parent.parent == tmp_path / "pipelines" / "1"
    assert layout.run_dir.resolve().is_relative_to((tmp_path / "pipelines" / "1").resolve())
    make_run_dirs(layout)
    assert layout.output.is_dir()


def test_different_keys_never_share_a_directory() -> None:
    keys = [
        "source=M 83",
        "source=M_83",
        "source=M/83",
        "k" * 121,
        "k" * 122,
        "k" * 120,
        "../",
        "..",
        "_",
        "x" * 120 + "~" + "0" * 20,
    ]

    names = [safe_name(key) for key in keys]

    assert len(set(names)) == len(keys)
    assert safe_name("source=M 83") == safe_name("source=M 83"), "stable"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, "all", 1, 1), "pipeline_id"),
        ((1, "all", -1, 1), "run_id"),
        ((1, "all", 1, 0), "attempt"),
    ],
)
def test_ids_must_be_positive(args: tuple[int, str, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_layout(ROOT, *args)


def test_make_run_dirs_creates_every_directory_and_can_repeat(tmp_path: Path) -> None:
    layout = run_layout(tmp_path, 1, "all", 1, 1)

    make_run_dirs(layout, step_name="calibrate")
    make_run_dirs(layout, step_name="calibrate")

    for path in (layout.input, layout.config, layout.workspace, layout.logs):
        assert path.is_dir()
    assert sorted(p.name for p in layout.output.iterdir()) == sorted(OUTPUT_SUBDIRS)
    assert (layout.workspace / "calibrate").is_dir()


def test_the_manifest_is_written_atomically_with_its_schema(tmp_path: Path) -> None:
    layout = run_layout(tmp_path, 1, "all", 1, 1)
    inputs = [{"path": "scan/lfa_0001.fits", "checksum": "ab", "checksum_algorithm": "sha256"}]

    path = write_manifest(
        layout, {"run_id": 1, "parameters": {"mode": "hot_cold"}, "inputs": inputs}
    )

    assert path == layout.config / "manifest.json"
    written = json.loads(path.read_text())
    assert written["schema"] == 1
    assert written["inputs"] == inputs and written["upstream_products"] == []
    assert written["parameters"] == {"mode": "hot_cold"}
    assert [p.name for p in layout.config.iterdir()] == ["manifest.json"]


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"inputs": "scan.fits"}, "'inputs' must be a list"),
        ({"inputs": [{"path": "a"}]}, "inputs\\[0\\] lacks checksum, checksum_algorithm"),
        (
            {"upstream_products": [{"path": "/abs", "checksum": "a", "checksum_algorithm": "s"}]},
            "must be relative",
        ),
        (
            {"inputs": [{"path": "a/../../b", "checksum": "a", "checksum_algorithm": "s"}]},
            "stay inside",
        ),
    ],
)
def test_a_malformed_manifest_is_refused_and_nothing_written(
    tmp_path: Path, manifest: dict[str, object], message: str
) -> None:
    layout = run_layout(tmp_path, 1, "all", 1, 1)

    with pytest.raises(ValueError, match=message):
        write_manifest(layout, manifest)

    assert not layout.manifest.exists()


# --- commands ---------------------------------------------------------------------------------


def _env_args(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--env"]
    return dict(pair.split("=", 1) for pair in pairs)


def test_behaviour_28_apptainer_binds_input_and_config_read_only_and_the_rest_read_write(
    layout: RunLayout,
) -> None:
    # Behaviour 28.
    argv, env = build_command(
        runtime="apptainer",
        image="ghcr.io/ccat/chai:1.2",
        sif_path="/data/sif-cache/chai-1.2.sif",
        argv=["reduce", "--fast"],
        layout=layout,
        step_name="calibrate",
        final_step=False,
    )

    assert argv[:2] == ["apptainer", "exec"]
    binds = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--bind"]
    assert binds == [
        f"{layout.input}:/workflow/input:ro",
        f"{layout.config}:/workflow/config:ro",
        f"{layout.workspace}:/workflow/workspace:rw",
        f"{layout.output}:/workflow/output:rw",
        f"{layout.logs}:/workflow/logs:rw",
    ]
    assert argv[-3:] == ["/data/sif-cache/chai-1.2.sif", "reduce", "--fast"]
    assert env["WORKFLOW_OUTPUT_DIR"] == "/workflow/workspace/calibrate/"
    assert _env_args(argv) == env
    assert env["WORKFLOW_INPUT_DIR"] == "/workflow/input"
    assert env["WORKFLOW_MANIFEST"] == "/workflow/config/manifest.json"
    assert env["WORKFLOW_STEP_NAME"] == "calibrate"


def test_the_final_step_writes_to_workflow_output(layout: RunLayout) -> None:
    _argv, env = build_command(
        runtime="apptainer",
        image="",
        sif_path="/sif/x.sif",
        argv=["reduce"],
        layout=layout,
        step_name="combine",
        final_step=True,
    )

    assert env["WORKFLOW_OUTPUT_DIR"] == "/workflow/output/"


def test_apptainer_falls_back_to_the_image_when_there_is_no_sif(layout: RunLayout) -> None:
    argv, _env = build_command(
        runtime="apptainer",
        image="docker://ghcr.io/ccat/chai:1.2",
        sif_path="",
        argv=["reduce"],
        layout=layout,
        step_name="s",
        final_step=True,
    )

    assert argv[-2:] == ["docker://ghcr.io/ccat/chai:1.2", "reduce"]


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_docker_and_podman_mount_the_same_directories_with_the_same_modes(
    runtime: str, layout: RunLayout
) -> None:
    argv, env = build_command(
        runtime=runtime,
        image="ghcr.io/ccat/chai:1.2",
        sif_path="/ignored.sif",
        argv=["reduce"],
        layout=layout,
        step_name="calibrate",
        final_step=True,
    )

    assert argv[:4] == [runtime, "run", "--rm", "--init"]
    mounts = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--mount"]
    assert mounts == [
        f"type=bind,source={layout.input},target=/workflow/input,readonly",
        f"type=bind,source={layout.config},target=/workflow/config,readonly",
        f"type=bind,source={layout.workspace},target=/workflow/workspace",
        f"type=bind,source={layout.output},target=/workflow/output",
        f"type=bind,source={layout.logs},target=/workflow/logs",
    ]
    assert argv[-2:] == ["ghcr.io/ccat/chai:1.2", "reduce"]
    assert _env_args(argv) == env
    assert env["WORKFLOW_OUTPUT_DIR"] == "/workflow/output/"
    if runtime == "docker":
        assert argv[argv.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    else:
        assert "--userns=keep-id" in argv


def test_runtime_none_runs_the_program_itself_with_host_paths(layout: RunLayout) -> None:
    argv, env = build_command(
        runtime="none",
        image="",
        sif_path="",
        argv=["python", "-m", "pipelines.demo.reduction", "calibrate"],
        layout=layout,
        step_name="calibrate",
        final_step=False,
    )

    assert argv == ["python", "-m", "pipelines.demo.reduction", "calibrate"]
    assert env["WORKFLOW_OUTPUT_DIR"] == f"{layout.workspace}/calibrate/"
    assert env["WORKFLOW_INPUT_DIR"] == str(layout.input)
    assert env["WORKFLOW_CONFIG_DIR"] == str(layout.config)
    assert env["WORKFLOW_WORKSPACE_DIR"] == str(layout.workspace)
    assert env["WORKFLOW_LOGS_DIR"] == str(layout.logs)
    assert env["WORKFLOW_MANIFEST"] == str(layout.manifest)
    _argv, final = build_command(
        runtime="none",
        image="",
        sif_path="",
        argv=["x"],
        layout=layout,
        step_name="c",
        final_step=True,
    )
    assert final["WORKFLOW_OUTPUT_DIR"] == f"{layout.output}/"


def test_an_unsafe_step_name_cannot_point_the_output_outside_the_workspace(
    layout: RunLayout,
) -> None:
    _argv, env = build_command(
        runtime="none",
        image="",
        sif_path="",
        argv=["x"],
        layout=layout,
        step_name="../../etc",
        final_step=False,
    )

    output = Path(env["WORKFLOW_OUTPUT_DIR"])
    assert output.parent == layout.workspace and ".." not in output.parts


def test_an_unknown_runtime_is_refused_naming_the_known_ones(layout: RunLayout) -> None:
    with pytest.raises(ValueError) as raised:
        build_command(
            runtime="singularity",
            image="i",
            sif_path="",
            argv=["x"],
            layout=layout,
            step_name="s",
            final_step=True,
        )

    assert "'singularity'" in str(raised.value)
    assert all(runtime in str(raised.value) for runtime in RUNTIMES)


@pytest.mark.parametrize(
    ("runtime", "image", "sif", "message"),
    [
        ("docker", "", "/x.sif", "docker needs an image"),
        ("podman", "", "", "podman needs an image"),
        ("apptainer", "", "", "apptainer needs a SIF path or an image"),
    ],
)
def test_a_container_runtime_without_an_image_is_refused(
    layout: RunLayout, runtime: str, image: str, sif: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_command(
            runtime=runtime,
            image=image,
            sif_path=sif,
            argv=["x"],
            layout=layout,
            step_name="s",
            final_step=True,
        )


def test_an_empty_command_is_refused(layout: RunLayout) -> None:
    with pytest.raises(ValueError, match="empty command"):
        build_command(
            runtime="none",
            image="",
            sif_path="",
            argv=[],
            layout=layout,
            step_name="s",
            final_step=True,
        )


@pytest.mark.parametrize("runtime", ["apptainer", "docker", "podman"])
def test_a_host_path_that_would_break_a_bind_is_refused(runtime: str) -> None:
    layout = run_layout(Path("/data/proc:essing"), 1, "all", 1, 1)

    with pytest.raises(ValueError, match="cannot be bound"):
        build_command(
            runtime=runtime,
            image="i",
            sif_path="/s.sif",
            argv=["x"],
            layout=layout,
            step_name="s",
            final_step=True,
        )


def test_runtime_none_runs_the_demo_reduction_on_the_contract(tmp_path: Path) -> None:
    # The whole contract without a container: layout, manifest, command, environment.
    layout = run_layout(tmp_path, 1, "executed_obs_unit=1", 1, 1)
    make_run_dirs(layout, step_name="calibrate")
    (layout.input / "scan").mkdir()
    data = bytes(range(256)) * 64
    (layout.input / "scan" / "lfa_0000.fits").write_bytes(data)

    write_manifest(
        layout,
        {
            "inputs": [
                {
                    "path": "scan/lfa_0000.fits",
                    "checksum": hashlib.sha256(data).hexdigest(),
                    "checksum_algorithm": "sha256",
                    "module": "LFA",
                }
            ]
        },
    )
    argv, env = build_command(
        runtime="none",
        image="",
        sif_path="",
        argv=[sys.executable, "-m", "pipelines.demo.reduction", "calibrate"],
        layout=layout,
        step_name="calibrate",
        final_step=False,
    )

    result = subprocess.run(
        argv, env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    produced = layout.workspace / "calibrate"
    assert (produced / "science" / "calibrated_LFA.csv").exists()
    assert (produced / "qa" / "metrics.json").exists()
    assert not any((layout.output / "science").iterdir()), "a non-final step writes no output/"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_extra_environment_reaches_the_program_in_every_runtime(
    runtime: str, layout: RunLayout
) -> None:
    argv, env = build_command(
        runtime=runtime,
        image="img",
        sif_path="/s.sif",
        argv=["reduce"],
        layout=layout,
        step_name="calibrate",
        final_step=True,
        extra_env={"WORKFLOW_RUN_ID": "45"},
    )

    assert env["WORKFLOW_RUN_ID"] == "45"
    if runtime != "none":
        assert "WORKFLOW_RUN_ID=45" in argv, "passed into the container, not only to the runtime"


def test_extra_environment_cannot_move_a_contract_directory(layout: RunLayout) -> None:
    with pytest.raises(ValueError, match="cannot redefine WORKFLOW_OUTPUT_DIR"):
        build_command(
            runtime="apptainer",
            image="",
            sif_path="/s.sif",
            argv=["reduce"],
            layout=layout,
            step_name="calibrate",
            final_step=True,
            extra_env={"WORKFLOW_OUTPUT_DIR": "/elsewhere"},
        )
