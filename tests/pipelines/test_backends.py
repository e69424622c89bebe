"""The backend interface (pipelines/backends/base.py): registry, job specs and statuses, resource
validation and the completion callback's environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured, ValidationError

from pipelines.backends.base import (
    BACKENDS,
    JOB_DONE_CALLBACK_ENV,
    JOB_FINISHED_TASK,
    JOB_STATES,
    JobSpec,
    JobStatus,
    get_backend,
    job_done_callback_env,
    validate_resource_shape,
)
from pipelines.backends.local import LocalBackend


def test_the_default_backend_is_local(settings: Any) -> None:
    del settings.HPC_BACKEND

    assert isinstance(get_backend(), LocalBackend)


def test_the_backend_follows_the_setting_and_a_name_given(settings: Any) -> None:
    settings.HPC_BACKEND = "local"

    assert get_backend().name == "local"
    assert get_backend("local").name == "local"


def test_an_unknown_backend_is_refused_naming_the_known_ones(settings: Any) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        get_backend("pbs")
    assert "'pbs'" in str(raised.value)
    assert all(name in str(raised.value) for name in BACKENDS)

    settings.HPC_BACKEND = "kubernetes-typo"
    with pytest.raises(ImproperlyConfigured, match="kubernetes-typo"):
        get_backend()


def test_every_registered_backend_imports_and_is_a_backend() -> None:
    for name in BACKENDS:
        backend = get_backend(name)
        assert backend.name == name
        for method in ("submit", "find", "get_status", "cancel", "get_logs", "validate_resources"):
            assert callable(getattr(backend, method))


def test_each_call_gives_a_new_instance_that_holds_no_job_state() -> None:
    assert get_backend("local") is not get_backend("local")


def test_the_local_backend_keeps_its_job_index_under_the_configured_directory(
    settings: Any, tmp_path: Path
) -> None:
    settings.LOCAL_BACKEND_DIR = tmp_path / "jobs"
    assert LocalBackend().state_dir == tmp_path / "jobs"

    del settings.LOCAL_BACKEND_DIR
    assert LocalBackend().state_dir == Path(settings.VAR_DIR) / "local_jobs"


@pytest.mark.parametrize("name", ["", "run 1", "run/1", "../x", "run-1-1;rm"])
def test_a_job_name_that_is_not_a_plain_word_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="job name"):
        JobSpec(name=name, command=["true"], run_dir=tmp_path)


def test_a_job_without_a_command_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty command"):
        JobSpec(name="run-1-1", command=[], run_dir=tmp_path)


def test_a_job_with_arguments_or_environment_that_are_not_strings_is_refused(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="must be strings: 3"):
        JobSpec(name="run-1-1", command=["reduce", 3], run_dir=tmp_path)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="RUN=1"):
        JobSpec(name="run-1-1", command=["x"], run_dir=tmp_path, env={"RUN": 1})  # type: ignore[dict-item]


def test_a_status_outside_the_normalised_vocabulary_is_refused() -> None:
    # Behaviour 51: pending, running, completed, failed and nothing else.
    assert JOB_STATES == ("pending", "running", "completed", "failed")
    with pytest.raises(ValueError, match="RUNNING"):
        JobStatus("job", "RUNNING")  # type: ignore[arg-type]
    assert JobStatus("job", "failed").is_finished
    assert not JobStatus("job", "pending").is_finished


@pytest.mark.parametrize(
    "resources",
    [
        {},
        {"cpu": 1},
        {"cpu": 1024, "memory_gb": 65536, "time_hours": 720},
        {"cpu": 4, "memory_gb": 0.5, "time_hours": 1 / 60},
    ],
)
def test_resources_in_range_are_accepted(resources: dict[str, Any]) -> None:
    assert validate_resource_shape(resources) == resources
    LocalBackend(state_dir=Path("/nonexistent")).validate_resources(resources)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ([1], "must be an object"),
        ({"gpus": 1}, "unknown resource 'gpus'"),
        ({"cpu": 0}, "'cpu' = 0 is out of range"),
        ({"cpu": 1025}, "out of range"),
        ({"cpu": 2.5}, "'cpu' must be an integer"),
        ({"cpu": True}, "'cpu' must be an integer"),
        ({"memory_gb": 0}, "more than 0"),
        ({"memory_gb": "16G"}, "'memory_gb' must be a number"),
        ({"memory_gb": float("nan")}, "out of range"),
        ({"time_hours": 0.001}, "'time_hours'"),
        ({"time_hours": 721}, "'time_hours'"),
    ],
)
def test_resources_out_of_range_are_refused_by_name(resources: Any, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        validate_resource_shape(resources)
    assert message in " ".join(raised.value.messages)


def test_the_callback_environment_names_the_task_the_run_and_the_broker(settings: Any) -> None:
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/9"

    env = job_done_callback_env(42)

    callback = json.loads(env[JOB_DONE_CALLBACK_ENV])
    assert callback["task"] == JOB_FINISHED_TASK == "pipelines.tasks.run_job_finished"
    assert callback["args"] == [42]
    assert callback["broker_url"] == "redis://127.0.0.1:6379/9"
    # Behaviour 50: the completion goes to a workflow queue.
    assert callback["queue"].startswith("workflow.")


def test_jobs_inherit_only_the_allowed_environment_never_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipelines.backends.base import inherited_environment
    from pipelines.backends.local import LocalBackend
    from pipelines.backends.slurm import SlurmBackend

    for key, value in {
        "DATABASE_URL": "postgres://secret@db/ops",
        "CELERY_BROKER_URL": "redis://:password@broker/0",
        "AWS_SECRET_ACCESS_KEY": "k",
        "LC_ALL": "C.UTF-8",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "DOCKER_HOST": "unix:///run/docker.sock",
    }.items():
        monkeypatch.setenv(key, value)
    base = inherited_environment()
    assert base["LC_ALL"] == "C.UTF-8" and "PATH" in base
    local = LocalBackend._environment({"WORKFLOW_RUN_ID": "7"})
    slurm = SlurmBackend._submit_environment()
    for env in (base, local, slurm):
        assert not {"DATABASE_URL", "CELERY_BROKER_URL", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert local["DOCKER_HOST"] and local["WORKFLOW_RUN_ID"] == "7" and "SLURM_CONF" not in local
    assert slurm["SLURM_CONF"] == "/etc/slurm/slurm.conf" and "DOCKER_HOST" not in slurm
