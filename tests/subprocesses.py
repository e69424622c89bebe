"""Running ``manage.py`` in a subprocess against a facility of its own: a fresh SQLite file and
file-system broker under ``tmp_path``, none of the developer's or CI's configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Variables that would point a subprocess at the developer's or CI's services.
CONFIG_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "FACILITY_DATA_ROOT",
    "REDUCTION_SCRIPT_DIR",
    "WORKFLOW_LEASE_SECONDS",
)


def clean_env(var_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in CONFIG_VARIABLES and not k.startswith("DJANGO_")
    }
    env["WORKFLOW_VAR_DIR"] = str(var_dir)
    env["DJANGO_SETTINGS_MODULE"] = "workflow_site.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def manage(
    var_dir: Path, *args: str, timeout: float = 180, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=clean_env(var_dir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def python(var_dir: Path, code: str, *, timeout: float = 180, **env: str) -> str:
    """Run ``code`` after ``django.setup()`` in a subprocess; returns its stdout, raises with
    its stderr on failure."""
    script = "import django\ndjango.setup()\n" + code
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=clean_env(var_dir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr}")
    return result.stdout
