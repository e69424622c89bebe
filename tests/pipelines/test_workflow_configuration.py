"""Workflow-manager behaviours 47 and 49 (configuration from the environment, and the managers'
heartbeats), named after the brief's checklist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.managers import manager_tick
from tests.pipelines.test_heartbeats import redis_store

__all__ = ["redis_store"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parents[2]


def _settings_in_clean_interpreter(
    env: dict[str, str], program: str
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "workflow_site.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_behaviour_47_an_environment_variable_overrides_the_default_backend() -> None:
    program = (
        "import json, django; django.setup()\n"
        "from django.conf import settings\n"
        "from pipelines.backends.base import get_backend\n"
        "print(json.dumps([settings.HPC_BACKEND, get_backend().name, settings.CONTAINER_RUNTIME]))"
    )
    result = _settings_in_clean_interpreter(
        {"HPC_BACKEND": "slurm", "CONTAINER_RUNTIME": "apptainer"}, program
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["slurm", "slurm", "apptainer"]


def test_an_unknown_backend_in_the_environment_is_a_clear_error() -> None:
    program = (
        "import django; django.setup()\n"
        "from pipelines.backends.base import get_backend\n"
        "get_backend()"
    )
    result = _settings_in_clean_interpreter({"HPC_BACKEND": "pbs"}, program)
    assert result.returncode != 0
    assert "pbs" in result.stderr and "local" in result.stderr


@pytest.mark.django_db
@pytest.mark.parametrize("manager", ["trigger", "workflow", "result"])
def test_behaviour_49_a_running_manager_keeps_its_heartbeat_key_alive_with_a_ttl(
    redis_store, settings, manager: str
) -> None:
    manager_tick(manager, owner="test")
    key = f"health:manager:{manager}"
    assert redis_store.get(key) == b"alive"
    assert 0 < redis_store.ttl(key) <= 90

    # Stopped (no more ticks), the key disappears once its time to live has passed.
    settings.WORKFLOW_HEARTBEAT_TTL = 1
    manager_tick(manager, owner="test")
    time.sleep(1.5)
    assert redis_store.get(key) is None
