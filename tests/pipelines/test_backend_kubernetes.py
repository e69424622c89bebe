"""The Kubernetes backend's pure parts: the Job object it builds and how it reads a Job and its
pods. Its handling of the API's answers is in test_backend_kubernetes_api.py (fake API server).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.backends.base import BACKENDS, JOB_DONE_CALLBACK_ENV, BackendError, JobSpec
from pipelines.backends.kubernetes import (
    job_manifest,
    job_status_from,
    k8s_name,
    memory_quantity,
)

RUN_DIR = Path("/srv/processing/pipelines/4/all/12-1")


def _spec(**overrides) -> JobSpec:  # type: ignore[no-untyped-def]
    values = {
        "name": "run-12-1",
        "command": ["apptainer", "exec", "/sif/calibrate.sif", "calibrate"],
        "run_dir": RUN_DIR,
        "env": {"WORKFLOW_OUTPUT_DIR": "/workflow/output/", JOB_DONE_CALLBACK_ENV: "{broker}"},
        "resources": {"cpu": 4, "memory_gb": 16},
    }
    values.update(overrides)
    return JobSpec(**values)


def _manifest(spec: JobSpec | None = None, **options):  # type: ignore[no-untyped-def]
    values = {"namespace": "ccat", "image": "registry.example/workflow-runner:1"}
    values.update(options)
    return job_manifest(spec or _spec(), **values)


def test_behaviour_30_kubernetes_resources_are_both_requests_and_limits_in_the_namespace() -> None:
    manifest = _manifest(namespace="workflow-tests")

    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert manifest["metadata"]["namespace"] == "workflow-tests"


def test_the_job_runs_the_command_once_and_is_deleted_after_its_ttl() -> None:
    manifest = _manifest(ttl_seconds=600, pull_policy="Always")

    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["metadata"]["name"] == "run-12-1"
    spec = manifest["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 600
    assert "activeDeadlineSeconds" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["command"] == ["apptainer", "exec", "/sif/calibrate.sif", "calibrate"]
    assert container["image"] == "registry.example/workflow-runner:1"
    assert container["imagePullPolicy"] == "Always"


def test_time_hours_becomes_the_active_deadline() -> None:
    manifest = _manifest(_spec(resources={"cpu": 1, "time_hours": 1.5}))

    assert manifest["spec"]["activeDeadlineSeconds"] == 5400


def test_labels_name_the_run_the_attempt_and_the_job_on_the_job_and_its_pod() -> None:
    manifest = _manifest()

    expected = {
        "app.kubernetes.io/managed-by": "workflow",
        "workflow/job-name": "run-12-1",
        "workflow/run-id": "12",
        "workflow/attempt": "1",
    }
    assert manifest["metadata"]["labels"] == expected
    assert manifest["spec"]["template"]["metadata"]["labels"] == expected
    assert manifest["metadata"]["annotations"] == {"workflow/run-dir": str(RUN_DIR)}


def test_the_environment_goes_to_the_container_without_the_completion_push() -> None:
    container = _manifest()["spec"]["template"]["spec"]["containers"][0]

    assert container["env"] == [{"name": "WORKFLOW_OUTPUT_DIR", "value": "/workflow/output/"}]
    assert JOB_DONE_CALLBACK_ENV not in str(_manifest())


def test_contract_directories_are_host_paths_at_the_same_place_input_and_config_read_only() -> None:
    pod = _manifest()["spec"]["template"]["spec"]

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount for mount in pod["containers"][0]["volumeMounts"]}
    assert set(volumes) == {
        f"workflow-{d}" for d in ("input", "config", "workspace", "output", "logs")
    }
    for directory in ("input", "config", "workspace", "output", "logs"):
        path = str(RUN_DIR / directory)
        assert volumes[f"workflow-{directory}"]["hostPath"] == {"path": path, "type": "Directory"}
        assert mounts[f"workflow-{directory}"]["mountPath"] == path
        assert mounts[f"workflow-{directory}"]["readOnly"] is (directory in ("input", "config"))


def test_with_a_claim_the_directories_are_sub_paths_of_it() -> None:
    pod = _manifest(pvc_name="processing", pvc_root="/srv/processing")["spec"]["template"]["spec"]

    assert pod["volumes"] == [
        {"name": "workflow-data", "persistentVolumeClaim": {"claimName": "processing"}}
    ]
    mounts = {mount["mountPath"]: mount for mount in pod["containers"][0]["volumeMounts"]}
    assert mounts[str(RUN_DIR / "input")]["subPath"] == "pipelines/4/all/12-1/input"
    assert mounts[str(RUN_DIR / "input")]["readOnly"] is True
    assert mounts[str(RUN_DIR / "output")]["readOnly"] is False


def test_a_run_directory_outside_the_claim_is_refused() -> None:
    with pytest.raises(BackendError, match="is not under K8S_PVC_ROOT /elsewhere"):
        _manifest(pvc_name="processing", pvc_root="/elsewhere")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("run-12-1", "run-12-1"), ("Run_12.1", None), ("x" * 80, None)],
)
def test_job_names_become_dns_labels_that_never_collide(name, expected) -> None:
    label = k8s_name(name)

    if expected is not None:
        assert label == expected
    assert len(label) <= 63
    assert label == label.lower() and label[0].isalnum() and label[-1].isalnum()
    assert k8s_name(name) == label  # stable: a retried submit finds the same Job
    assert k8s_name(name + "x") != label


@pytest.mark.parametrize(("gigabytes", "expected"), [(16, "16Gi"), (0.5, "512Mi"), (1.3, "1332Mi")])
def test_memory_becomes_a_binary_quantity(gigabytes, expected) -> None:
    assert memory_quantity(gigabytes) == expected


# --- status ----------------------------------------------------------------------------------


def _job(conditions=(), **status):  # type: ignore[no-untyped-def]
    return {
        "metadata": {"name": "run-12-1"},
        "status": {"conditions": list(conditions), **status},
    }


def _pod(phase: str, state: dict | None = None, *, created: str = "2026-12-02T10:00:00Z", **status):  # type: ignore[no-untyped-def]
    container = {"name": "step", "state": state or {}}
    return {
        "metadata": {"name": f"run-12-1-{created[-3:-1]}", "creationTimestamp": created},
        "status": {"phase": phase, "containerStatuses": [container], **status},
    }


def _terminated(code: int, reason: str = "Completed") -> dict:
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "startedAt": "2026-12-02T10:00:05Z",
            "finishedAt": "2026-12-02T10:01:05Z",
        }
    }


def test_a_job_without_a_pod_yet_is_pending() -> None:
    status = job_status_from("ns/run-12-1", _job(active=1), [])

    assert (status.state, status.reason) == ("pending", "")


def test_an_unschedulable_pod_is_pending_with_the_schedulers_reason() -> None:
    pod = _pod(
        "Pending",
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
    )

    status = job_status_from("ns/run-12-1", _job(), [pod])

    assert (status.state, status.reason) == ("pending", "Unschedulable")


def test_an_image_being_pulled_is_pending_and_an_invalid_image_fails() -> None:
    pulling = _pod("Pending", {"waiting": {"reason": "ImagePullBackOff"}})
    invalid = _pod("Pending", {"waiting": {"reason": "InvalidImageName", "message": "bad ref"}})

    assert job_status_from("ns/a", _job(), [pulling]).state == "pending"
    failed = job_status_from("ns/a", _job(), [invalid])
    assert (failed.state, failed.reason) == ("failed", "InvalidImageName: bad ref")


def test_a_running_container_is_running() -> None:
    pod = _pod("Running", {"running": {"startedAt": "2026-12-02T10:00:05Z"}})

    status = job_status_from("ns/run-12-1", _job(active=1, startTime="2026-12-02T10:00:01Z"), [pod])

    assert status.state == "running"
    assert status.started_at is not None


def test_a_complete_job_is_completed_with_exit_code_0_and_its_wall_time() -> None:
    job = _job(
        [{"type": "Complete", "status": "True"}],
        startTime="2026-12-02T10:00:00Z",
        completionTime="2026-12-02T10:01:30Z",
    )

    status = job_status_from("ns/run-12-1", job, [_pod("Succeeded", _terminated(0))])

    assert (status.state, status.exit_code, status.reason) == ("completed", 0, "")
    assert status.wall_seconds == 90.0


def test_a_failed_job_names_the_pods_reason_and_exit_code() -> None:
    job = _job([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])

    oom = job_status_from("ns/a", job, [_pod("Failed", _terminated(137, "OOMKilled"))])
    error = job_status_from("ns/a", job, [_pod("Failed", _terminated(3, "Error"))])

    assert (oom.state, oom.exit_code, oom.reason) == ("failed", 137, "OOMKilled (exit code 137)")
    assert (error.state, error.exit_code, error.reason) == ("failed", 3, "exit code 3")


def test_a_job_past_its_deadline_fails_with_the_jobs_reason() -> None:
    job = _job(
        [
            {
                "type": "Failed",
                "status": "True",
                "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline",
                "lastTransitionTime": "2026-12-02T11:00:00Z",
            }
        ],
        startTime="2026-12-02T10:00:00Z",
    )

    status = job_status_from("ns/a", job, [])

    assert status.state == "failed"
    assert status.reason == "DeadlineExceeded: Job was active longer than specified deadline"
    assert status.wall_seconds == 3600.0


def test_a_pod_that_ended_before_the_job_noticed_decides() -> None:
    assert job_status_from("ns/a", _job(), [_pod("Succeeded", _terminated(0))]).state == "completed"
    failed = job_status_from("ns/a", _job(), [_pod("Failed", _terminated(2, "Error"))])
    assert (failed.state, failed.exit_code) == ("failed", 2)


def test_the_newest_pod_is_the_one_read() -> None:
    old = _pod("Failed", _terminated(1, "Error"), created="2026-12-02T10:00:00Z")
    new = _pod("Running", {"running": {}}, created="2026-12-02T10:05:00Z")

    assert job_status_from("ns/a", _job(), [new, old]).state == "running"


def test_a_job_that_is_gone_is_lost() -> None:
    status = job_status_from("ns/run-12-1", None, [])

    assert status.state == "failed"
    assert status.reason.startswith("lost: the Job no longer exists")


def test_the_registry_names_the_kubernetes_backend() -> None:
    assert BACKENDS["kubernetes"] == "pipelines.backends.kubernetes.KubernetesBackend"


# --- behaviour 46: defaults ------------------------------------------------------------------

BACKEND_SETTINGS = (
    "HPC_BACKEND",
    "SLURM_PARTITION",
    "SLURM_BACKEND_DIR",
    "K8S_NAMESPACE",
    "K8S_JOB_IMAGE",
    "K8S_IMAGE_PULL_POLICY",
    "K8S_JOB_TTL_SECONDS",
    "K8S_PVC_NAME",
    "K8S_PVC_ROOT",
)


def _readme_defaults(root: Path) -> dict[str, str]:
    """The README environment table's default column: the first `code` in the cell, ``""`` for
    a cell that starts with "empty", ``<var>`` spelled out as the repository's var directory."""
    defaults: dict[str, str] = {}
    for line in (root / "README.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", line)
        if not match:
            continue
        cell = match.group(2).strip()
        code = re.search(r"`([^`]*)`", cell)
        value = "" if cell.startswith("empty") or code is None else code.group(1)
        defaults[match.group(1)] = value.replace("<var>", str(root / "var"))
    return defaults


def test_behaviour_46_backend_defaults_are_the_ones_in_the_readme_environment_table() -> None:
    """Our defaults (README) rather than CCAT's: local backend, namespace "workflow", no
    partition. Settings are loaded in a fresh interpreter with no overrides in its environment."""
    root = Path(__file__).resolve().parents[2]
    program = (
        "import json; from workflow_site import settings as s; "
        f"print(json.dumps({{k: str(getattr(s, k)) for k in {list(BACKEND_SETTINGS)!r}}}))"
    )
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root)}

    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=root,
        env=clean_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    actual = json.loads(result.stdout)
    documented = _readme_defaults(root)

    assert {key: documented.get(key) for key in BACKEND_SETTINGS} == actual
    assert actual["HPC_BACKEND"] == "local"
    assert actual["K8S_NAMESPACE"] == "workflow"
    assert actual["SLURM_PARTITION"] == ""
