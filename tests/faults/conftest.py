"""Fixtures of the fault-injection tests: a migrated template database (once per session), and
per test a database copied from it, a redis-server and a facility of real processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_service
from tests.subprocesses import ROOT, clean_env

from .harness import (
    Facility,
    RedisServer,
    admin_sql,
    database_url,
    drop_database,
    postgres_available,
)


@pytest.fixture(scope="session")
def template_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_service(postgres_available(), "fault tests need PostgreSQL on 127.0.0.1:5432")
    require_service(
        shutil.which("redis-server") is not None, "fault tests need the redis-server program"
    )
    name = f"faults_template_{uuid.uuid4().hex[:8]}"
    admin_sql(f'CREATE DATABASE "{name}"')
    try:
        result = subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=ROOT,
            env=clean_env(
                tmp_path_factory.mktemp("template") / "var", DATABASE_URL=database_url(name)
            ),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        yield name
    finally:
        drop_database(name)


@pytest.fixture
def facility(template_database: str, tmp_path: Path) -> Iterator[Facility]:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    place = Facility(tmp_path, template_database, redis)
    try:
        yield place
    finally:
        place.close()
        redis.kill()
