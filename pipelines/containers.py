"""The /workflow contract: where a run attempt's files live and how its command is built.

Every attempt of a run gets its own directory on the processing location, so a retry never sees
(or registers) a failed attempt's outputs::

    {processing root}/pipelines/{pipeline_id}/{safe sub_group_key}/{run_id}-{attempt}/
        input/      staged raw files (and upstream products) the step reads     read-only
        config/     manifest.json, the instrument's reduction script           read-only
        workspace/  intermediates; a non-final step writes to workspace/{step}/ read-write
        output/     final products: science/ qa/ plots/ statistics/ logs/      read-write
        logs/       the backend's files (stdout, stderr, exit code)            read-write

Inside a container these are ``/workflow/input`` ... ``/workflow/logs`` (behaviour 28). The
program learns everything from its environment: ``WORKFLOW_INPUT_DIR``, ``WORKFLOW_CONFIG_DIR``,
``WORKFLOW_WORKSPACE_DIR``, ``WORKFLOW_OUTPUT_DIR`` (``/workflow/workspace/{step}/`` for a
non-final step, ``/workflow/output/`` for the final one), ``WORKFLOW_LOGS_DIR``,
``WORKFLOW_MANIFEST`` and ``WORKFLOW_STEP_NAME``. Runtime ``none`` runs the same contract
without a container: the same variables, pointing at the host directories.

Exit code 0 means success, anything else failure. Files at the top level of ``output/`` (outside
the five subdirectories) are the result-manager's to decide; the demo reduction writes none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIMES = ("none", "apptainer", "podman", "docker")

CONTAINER_ROOT = "/workflow"
# Subdirectories of output/ and the DataProduct type the result-manager gives their files.
OUTPUT_SUBDIRS = ("science", "qa", "plots", "statistics", "logs")
# The directories of an attempt, each bound at /workflow/<name> in a container.
_DIR_NAMES = ("input", "config", "workspace", "output", "logs")
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1

# A sub-group key or step name is used as a directory name as it is when it is made of these
# characters, starts with a letter or digit and is at most SAFE_NAME_LENGTH long; anything else
# is replaced and gets a hash suffix after "~", a character the plain form never contains, so two
# different keys never share a directory.
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=;+@-]*")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9._=;+@-]")
SAFE_NAME_LENGTH = 120
# Characters that would split a bind specification (apptainer --bind, docker --mount).
_BIND_BREAKERS = (",", ":", "\n")


@dataclass(frozen=True)
class RunLayout:
    """Host paths of one run attempt (see the module docstring)."""

    run_dir: Path
    input: Path
    config: Path
    workspace: Path
    output: Path
    logs: Path

    @property
    def manifest(self) -> Path:
        return self.config / MANIFEST_NAME

    def mounts(self) -> list[tuple[Path, str, bool]]:
        """(host path, container path, read_only) for each bound directory, in bind order."""
        return [
            (self.input, f"{CONTAINER_ROOT}/input", True),
            (self.config, f"{CONTAINER_ROOT}/config", True),
            (self.workspace, f"{CONTAINER_ROOT}/workspace", False),
            (self.output, f"{CONTAINER_ROOT}/output", False),
            (self.logs, f"{CONTAINER_ROOT}/logs", False),
        ]


def safe_name(name: str) -> str:
    """``name`` as one directory name: unchanged when it is already safe (``all``,
    ``executed_obs_unit=12``, ``source=NGC253;line=CO43``); otherwise unsafe characters
    replaced by ``_``, cut to fit, and ``~`` plus 20 hex digits of its sha256 appended. Never
    empty, never ``.`` or ``..``, never contains ``/``, at most SAFE_NAME_LENGTH + 21
    characters, and different names give different results."""
    if len(name) <= SAFE_NAME_LENGTH and _SAFE.fullmatch(name) and name not in {".", ".."}:
        return name
    digest = hashlib.sha256(name.encode("utf-8", errors="surrogatepass")).hexdigest()[:20]
    readable = _UNSAFE_CHAR.sub("_", name)[:SAFE_NAME_LENGTH].lstrip("._") or "key"
    return f"{readable}~{digest}"


def run_layout(
    processing_root: Path, pipeline_id: int, sub_group_key: str, run_id: int, attempt: int
) -> RunLayout:
    """The directories of attempt ``attempt`` of run ``run_id`` (no I/O). Raises ValueError for
    a non-positive id or attempt; the sub-group key goes through ``safe_name`` so the result
    always lies inside ``processing_root/pipelines``."""
    for label, number in (("pipeline_id", pipeline_id), ("run_id", run_id), ("attempt", attempt)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{label} must be a positive integer, got {number!r}")
    run_dir = (
        Path(processing_root)
        / "pipelines"
        / str(pipeline_id)
        / safe_name(sub_group_key)
        / f"{run_id}-{attempt}"
    )
    return RunLayout(
        run_dir=run_dir,
        input=run_dir / "input",
        config=run_dir / "config",
        workspace=run_dir / "workspace",
        output=run_dir / "output",
        logs=run_dir / "logs",
    )


def make_run_dirs(layout: RunLayout, *, step_name: str | None = None) -> None:
    """Create every directory of the layout, ``output/{science,qa,plots,statistics,logs}`` and,
    given ``step_name``, ``workspace/{step}`` (a non-final step's output). Safe to repeat."""
    for path in (layout.input, layout.config, layout.workspace, layout.logs):
        path.mkdir(parents=True, exist_ok=True)
    for sub in OUTPUT_SUBDIRS:
        (layout.output / sub).mkdir(parents=True, exist_ok=True)
    if step_name is not None:
        (layout.workspace / safe_name(step_name)).mkdir(parents=True, exist_ok=True)


def write_manifest(layout: RunLayout, manifest: dict[str, Any]) -> Path:
    """Write ``config/manifest.json`` atomically (write, fsync, rename) and return its path.

    The manifest is the program's whole execution context. Schema (version 1), checked here so a
    malformed manifest is refused before any job starts (ValueError naming the field)::

        {
          "schema": 1,
          "run_id": 12, "attempt": 1, "step": "calibrate", "pipeline_id": 3,
          "sub_group_key": "executed_obs_unit=...", "sub_group_values": {...},
          "parameters": {...},                  # the step's configuration
          "inputs": [                           # staged raw files
            {"path": "<relative to input/>", "checksum": "<hex>",
             "checksum_algorithm": "sha256" | "xxh3_128", "size": 65536,
             "raw_data_file_id": "...", "raw_data_package_id": 7, "instrument": "CHAI",
             "module": "LFA"}
          ],
          "upstream_products": [                # products of completed upstream runs
            {"path": "<relative to input/>", "checksum": "...", "checksum_algorithm": "...",
             "product_id": 5, "product_type": "SCIENCE", "step": "calibrate", "run_id": 9}
          ],
          "excluded_inputs": [...]              # left out, and why
        }

    ``path`` is relative to ``input/`` (so the same manifest holds inside and outside a
    container); ``schema``, ``inputs`` and ``upstream_products`` default to 1 and empty lists.
    """
    manifest = {"schema": MANIFEST_SCHEMA, "inputs": [], "upstream_products": [], **manifest}
    for field in ("inputs", "upstream_products"):
        entries = manifest[field]
        if not isinstance(entries, list):
            raise ValueError(f"manifest {field!r} must be a list")
        for index, entry in enumerate(entries):
            missing = [k for k in ("path", "checksum", "checksum_algorithm") if k not in entry]
            if missing:
                raise ValueError(f"manifest {field}[{index}] lacks {', '.join(missing)}")
            path = str(entry["path"])
            if path.startswith("/") or ".." in Path(path).parts:
                raise ValueError(
                    f"manifest {field}[{index}] path {path!r} must be relative to input/ "
                    "and stay inside it"
                )
    target = layout.manifest
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    return target


def container_paths(layout: RunLayout, *, runtime: str) -> dict[str, str]:
    """The directory each WORKFLOW_* variable names: container paths for a container runtime,
    the host directories for ``none``."""
    if runtime == "none":
        return {
            "input": str(layout.input),
            "config": str(layout.config),
            "workspace": str(layout.workspace),
            "output": str(layout.output),
            "logs": str(layout.logs),
        }
    return {name: f"{CONTAINER_ROOT}/{name}" for name in _DIR_NAMES}


def workflow_env(
    layout: RunLayout, *, runtime: str, step_name: str, final_step: bool
) -> dict[str, str]:
    """The WORKFLOW_* variables of the contract for one step."""
    paths = container_paths(layout, runtime=runtime)
    output = (
        f"{paths['output']}/" if final_step else f"{paths['workspace']}/{safe_name(step_name)}/"
    )
    return {
        "WORKFLOW_INPUT_DIR": paths["input"],
        "WORKFLOW_CONFIG_DIR": paths["config"],
        "WORKFLOW_WORKSPACE_DIR": paths["workspace"],
        "WORKFLOW_OUTPUT_DIR": output,
        "WORKFLOW_LOGS_DIR": paths["logs"],
        "WORKFLOW_MANIFEST": f"{paths['config']}/{MANIFEST_NAME}",
        "WORKFLOW_STEP_NAME": step_name,
    }


def build_command(
    *,
    runtime: str,
    image: str,
    sif_path: str,
    argv: list[str],
    layout: RunLayout,
    step_name: str,
    final_step: bool,
    extra_env: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv that runs ``argv`` under ``runtime`` and the environment to start it with.

    - ``none``: ``argv`` itself; the environment points at the host directories.
    - ``apptainer``: ``apptainer exec --cleanenv --contain --bind ...:ro ... --env K=V ...
      --pwd /workflow/workspace <sif_path or image> argv`` (behaviour 28).
    - ``docker`` / ``podman``: ``<runtime> run --rm --init --mount type=bind,...,readonly ...
      --env K=V ... --workdir /workflow/workspace <image> argv``, as this user (docker
      ``--user uid:gid``, podman ``--userns=keep-id``) so products belong to the facility.

    Input and config are bound read-only, workspace, output and logs read-write. The returned
    environment holds the same WORKFLOW_* variables for the runtime process (containers get
    them through ``--env``). ``extra_env`` (``WORKFLOW_RUN_ID`` and the like) goes the same way,
    into the container too; it cannot change a variable of the contract (repeating one is
    fine). Keep what the program must not see (the completion callback's broker URL) out of it
    and in ``JobSpec.env`` only. Raises ValueError for an unknown runtime (naming the known
    ones), an empty ``argv``, a missing image, a host path that a bind specification cannot
    hold, or an ``extra_env`` that changes a contract variable.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown container runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    if not argv:
        raise ValueError(f"step {step_name!r}: empty command")
    env = workflow_env(layout, runtime=runtime, step_name=step_name, final_step=final_step)
    clashes = sorted(k for k, v in (extra_env or {}).items() if k in env and env[k] != v)
    if clashes:
        raise ValueError(f"extra_env cannot redefine {', '.join(clashes)} (the contract sets them)")
    env.update(extra_env or {})
    if runtime == "none":
        return list(argv), env
    for host, _target, _ro in layout.mounts():
        if any(c in str(host) for c in _BIND_BREAKERS):
            raise ValueError(
                f"host path {str(host)!r} cannot be bound into a container: it contains one "
                f"of {' '.join(map(repr, _BIND_BREAKERS))}"
            )
    env_args = [arg for key, value in sorted(env.items()) for arg in ("--env", f"{key}={value}")]
    workdir = f"{CONTAINER_ROOT}/workspace"
    if runtime == "apptainer":
        image_ref = sif_path or image
        if not image_ref:
            raise ValueError(f"step {step_name!r}: apptainer needs a SIF path or an image")
        binds = [
            arg
            for host, target, read_only in layout.mounts()
            for arg in ("--bind", f"{host}:{target}:{'ro' if read_only else 'rw'}")
        ]
        command = ["apptainer", "exec", "--cleanenv", "--contain", *binds, *env_args]
        return [*command, "--pwd", workdir, image_ref, *argv], env
    if not image:
        raise ValueError(f"step {step_name!r}: {runtime} needs an image")
    mounts = []
    for host, target, read_only in layout.mounts():
        spec = f"type=bind,source={host},target={target}"
        mounts += ["--mount", f"{spec},readonly" if read_only else spec]
    user = (
        ["--user", f"{os.getuid()}:{os.getgid()}"] if runtime == "docker" else ["--userns=keep-id"]
    )
    command = [runtime, "run", "--rm", "--init", *user, *mounts, *env_args, "--workdir", workdir]
    return [*command, image, *argv], env
