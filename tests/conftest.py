"""Shared fixtures and the service gate.

Integration tests ask for a service with ``require_service(name, reason)``: when the service is
missing they skip with that reason, except under ``REQUIRE_SERVICES=1`` (set by ``.ci/run``),
where a missing service fails the test.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES", "").strip().lower() in {"1", "true", "yes"}


def require_service(available: bool, reason: str) -> None:
    if available:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def require_postgres(db: None) -> None:
    from django.db import connection

    require_service(
        connection.vendor == "postgresql",
        f"needs PostgreSQL: set DATABASE_URL=postgres://... (this run uses {connection.vendor})",
    )


@pytest.fixture(autouse=True)
def _isolated_var_dir(settings, tmp_path):  # type: ignore[no-untyped-def]
    """Keep files a test writes (demo data, scripts) out of the developer's var/."""
    settings.FACILITY_DATA_ROOT = tmp_path / "data"
    settings.REDUCTION_SCRIPT_DIR = tmp_path / "reduction_scripts"
    # The local backend's job index (backends): one per test, like the run directories it links.
    settings.LOCAL_BACKEND_DIR = tmp_path / "local_jobs"
    # Factories hash a password per user; the production hasher costs ~0.3 s each.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return tmp_path
