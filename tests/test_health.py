"""The /health probe: 200 when its dependencies answer, 503 naming the one that does not, and
never an HTTPS redirect, which Kubernetes would count as healthy even with the database down.

The redirect only exists under the production settings, which are read once per process, so
those checks run a Django test client in a subprocess (the way tests/test_settings.py does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import OperationalError

from tests.test_settings import ROOT, _clean_env, _production_env

# A password, user and host that must never reach an unauthenticated caller.
_UNREACHABLE_DB = "postgres://probe_user:probe-s3cret@127.0.0.1:1/opsdb?connect_timeout=2"

_PROBE = """
import json
import django
django.setup()
from django.core.management import call_command
from django.test import Client

try:  # a migrated database and a cache table, when the database is up at all
    call_command("migrate", verbosity=0)
    call_command("createcachetable", verbosity=0)
except Exception:
    pass

client = Client()
out = {}
for path in ("/health", "/"):
    response = client.get(path, headers={"host": "workflow.example.org"})
    out[path] = {
        "status": response.status_code,
        "location": response.get("Location"),
        "body": response.content.decode(),
        "cache_control": response.get("Cache-Control", ""),
    }
print(json.dumps(out))
"""


def _probe_production(tmp_path: Path, **env: str) -> dict[str, dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env=_clean_env(tmp_path, **_production_env(), **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, dict[str, object]] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


# --- in this process ---------------------------------------------------------------------------
@pytest.mark.django_db
def test_it_answers_200_when_the_database_broker_and_cache_answer(client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("status", "database", "broker", "cache")} == {
        "status": "ok",
        "database": "ok",
        "broker": "ok",
        "cache": "ok",
    }
    assert "no-store" in response["Cache-Control"]


@pytest.mark.django_db
@pytest.mark.parametrize("dependency", ["database", "broker", "cache"])
def test_it_answers_503_naming_the_dependency_without_the_driver_message(
    client, monkeypatch, caplog, dependency: str
) -> None:
    secret = 'connection to server at "10.1.2.3", port 5432 failed: password for user "ops"'

    def broken(*args: object, **kwargs: object) -> None:
        raise OperationalError(secret)

    monkeypatch.setattr(f"pipelines.health._{dependency}", broken)

    response = client.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body[dependency]) == ("degraded", "error")
    for other in {"database", "broker", "cache"} - {dependency}:
        assert body[other] == "ok"
    for detail in ("10.1.2.3", "5432", "ops", "password"):
        assert detail not in response.content.decode()
    assert any(record.exc_info and secret in str(record.exc_info[1]) for record in caplog.records)


@pytest.mark.django_db
def test_it_reports_each_managers_last_tick_and_lag_and_the_failed_counts(client, settings) -> None:
    from django.core.cache import cache

    from pipelines.managers import manager_tick
    from tests import factories as f

    # Heartbeats of this test only: other tests (and CI's Redis) may have left some behind.
    settings.REDIS_URL = ""
    cache.clear()

    f.StagingJobFactory(status="failed")
    before = client.get("/health").json()
    assert before["managers"]["packaging"] == {
        "alive": False,
        "last_tick": None,
        "lag_seconds": None,
    }

    manager_tick("packaging", owner="test")

    body = client.get("/health").json()
    packaging = body["managers"]["packaging"]
    assert packaging["alive"] is True and packaging["last_tick"]
    assert packaging["lag_seconds"] == 0.0
    assert body["failed"]["staging_job"] == 1
    assert body["failed"]["raw_data_package"] == 0
    assert "data_transfer.unpack_status" in body["failed"]


# --- under the production settings, in a subprocess --------------------------------------------
@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """/health and / fetched over plain HTTP under the production settings, database up."""
    return _probe_production(tmp_path_factory.mktemp("production"))


def test_it_is_not_redirected_to_https_under_the_production_settings(production) -> None:
    probe = production["/health"]
    assert probe["status"] == 200, probe
    body = json.loads(str(probe["body"]))
    assert (body["status"], body["database"], body["broker"], body["cache"]) == (
        "ok",
        "ok",
        "ok",
        "ok",
    )


def test_it_answers_503_not_a_redirect_when_the_production_database_is_down(tmp_path) -> None:
    probe = _probe_production(tmp_path, DATABASE_URL=_UNREACHABLE_DB)["/health"]
    assert probe["status"] == 503, probe
    assert probe["location"] is None
    body = json.loads(str(probe["body"]))
    assert (body["status"], body["database"]) == ("degraded", "error")
    for detail in ("127.0.0.1", "probe_user", "probe-s3cret", "opsdb"):
        assert detail not in str(probe["body"])


def test_other_pages_are_still_redirected_to_https_under_the_production_settings(
    production,
) -> None:
    probe = production["/"]
    assert probe["status"] == 301
    assert probe["location"] == "https://workflow.example.org/"
