"""Settings come from the environment through typed helpers that fail loudly; production
variables switch the database, cache, channel layer and security settings.

Whole-settings checks run ``manage.py`` in a subprocess with a controlled environment, because
settings are read once per process.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.subprocesses import ROOT, clean_env, manage
from workflow_site.env import (
    env_bool,
    env_choice,
    env_int,
    env_list,
    env_path,
    env_str,
    parse_database_url,
)


# --- env helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["1", "true", "TRUE", " yes ", "on"])
def test_env_bool_reads_true_values(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("WF_TEST_FLAG", raw)
    assert env_bool("WF_TEST_FLAG", False) is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "off", ""])
def test_env_bool_reads_false_values(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("WF_TEST_FLAG", raw)
    assert env_bool("WF_TEST_FLAG", True) is False


def test_env_bool_uses_the_default_when_unset(monkeypatch) -> None:
    monkeypatch.delenv("WF_TEST_FLAG", raising=False)
    assert env_bool("WF_TEST_FLAG", True) is True
    assert env_bool("WF_TEST_FLAG", False) is False


@pytest.mark.parametrize("raw", ["maybe", "2", "y e s", "enabled"])
def test_env_bool_rejects_malformed_values_naming_the_variable(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("WF_TEST_FLAG", raw)
    with pytest.raises(ImproperlyConfigured, match=r"WF_TEST_FLAG=.*is not a boolean"):
        env_bool("WF_TEST_FLAG", False)


def test_env_int_parses_and_defaults(monkeypatch) -> None:
    monkeypatch.setenv("WF_TEST_INT", " 42 ")
    assert env_int("WF_TEST_INT", 7) == 42
    monkeypatch.setenv("WF_TEST_INT", "")
    assert env_int("WF_TEST_INT", 7) == 7
    monkeypatch.delenv("WF_TEST_INT")
    assert env_int("WF_TEST_INT", 7) == 7


@pytest.mark.parametrize("raw", ["ten", "1.5", "0x10", "12abc"])
def test_env_int_rejects_non_integers_naming_the_variable(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("WF_TEST_INT", raw)
    with pytest.raises(ImproperlyConfigured, match=r"WF_TEST_INT=.*is not an integer"):
        env_int("WF_TEST_INT", 1)


def test_env_int_enforces_its_minimum(monkeypatch) -> None:
    monkeypatch.setenv("WF_TEST_INT", "5")
    with pytest.raises(ImproperlyConfigured, match="WF_TEST_INT=5 must be at least 10"):
        env_int("WF_TEST_INT", 900, minimum=10)
    monkeypatch.setenv("WF_TEST_INT", "10")
    assert env_int("WF_TEST_INT", 900, minimum=10) == 10


def test_env_choice_accepts_listed_values_case_insensitively(monkeypatch) -> None:
    monkeypatch.setenv("WF_TEST_CHOICE", "SLURM")
    assert env_choice("WF_TEST_CHOICE", ("local", "slurm"), "local") == "slurm"
    monkeypatch.delenv("WF_TEST_CHOICE")
    assert env_choice("WF_TEST_CHOICE", ("local", "slurm"), "local") == "local"


def test_env_choice_rejects_other_values_naming_the_variable_and_choices(monkeypatch) -> None:
    monkeypatch.setenv("WF_TEST_CHOICE", "pbs")
    with pytest.raises(ImproperlyConfigured) as excinfo:
        env_choice("WF_TEST_CHOICE", ("local", "slurm", "kubernetes"), "local")
    assert "WF_TEST_CHOICE='pbs'" in str(excinfo.value)
    assert "local, slurm, kubernetes" in str(excinfo.value)


def test_env_list_splits_on_commas_and_drops_blanks(monkeypatch) -> None:
    monkeypatch.setenv("WF_TEST_LIST", " a.example.org, ,b.example.org ,")
    assert env_list("WF_TEST_LIST") == ["a.example.org", "b.example.org"]
    monkeypatch.delenv("WF_TEST_LIST")
    assert env_list("WF_TEST_LIST", ["x"]) == ["x"]


def test_env_str_and_env_path(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WF_TEST_STR", "  value  ")
    assert env_str("WF_TEST_STR") == "value"
    monkeypatch.setenv("WF_TEST_PATH", str(tmp_path / "sub" / ".." / "data"))
    assert env_path("WF_TEST_PATH", Path("/nowhere")) == tmp_path / "data"
    monkeypatch.delenv("WF_TEST_PATH")
    assert env_path("WF_TEST_PATH", Path("/default")) == Path("/default")


# --- parse_database_url --------------------------------------------------------------------------
def test_sqlite_relative_path_is_under_the_base_dir(tmp_path) -> None:
    db = parse_database_url("sqlite:///var/ops.sqlite3", base_dir=tmp_path)
    assert db["ENGINE"] == "django.db.backends.sqlite3"
    assert db["NAME"] == str(tmp_path / "var" / "ops.sqlite3")


def test_sqlite_absolute_path_is_kept(tmp_path) -> None:
    db = parse_database_url("sqlite:////srv/ops/ops.sqlite3", base_dir=tmp_path)
    assert db["NAME"] == "/srv/ops/ops.sqlite3"


def test_sqlite_is_configured_for_several_processes(tmp_path) -> None:
    options = parse_database_url("sqlite:///ops.sqlite3", base_dir=tmp_path)["OPTIONS"]
    assert isinstance(options, dict)
    assert options["timeout"] == 30
    assert "journal_mode=WAL" in options["init_command"]


def test_postgres_url_with_escaped_password(tmp_path) -> None:
    db = parse_database_url(
        "postgres://ops_user:p%40ss%3Aw%2Frd%25@db.example.org:6543/ops_db", base_dir=tmp_path
    )
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert db["USER"] == "ops_user"
    assert db["PASSWORD"] == "p@ss:w/rd%"
    assert db["HOST"] == "db.example.org"
    assert db["PORT"] == "6543"
    assert db["NAME"] == "ops_db"
    assert db["CONN_MAX_AGE"] == 60


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "pgsql"])
def test_postgres_scheme_aliases_without_credentials_or_port(tmp_path, scheme: str) -> None:
    db = parse_database_url(f"{scheme}://127.0.0.1/postgres", base_dir=tmp_path)
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "",
        "",
        "127.0.0.1",
        "",
        "postgres",
    )


def test_postgres_query_parameters_become_options(tmp_path) -> None:
    db = parse_database_url(
        "postgres://u@h:5432/d?sslmode=require&conn_max_age=0", base_dir=tmp_path
    )
    assert db["CONN_MAX_AGE"] == 0
    assert db["OPTIONS"] == {"sslmode": "require"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:p@h/db", "scheme 'mysql' is not supported"),
        ("ops.sqlite3", "scheme '' is not supported"),
        ("postgres://u:p@h:5432/", "names no database"),
        ("postgres://u:p@h:5432", "names no database"),
        ("postgres://u:p@h:port/db", "malformed port"),
        ("postgres://u:p@h:99999/db", "malformed port"),
        ("sqlite:///", "names no SQLite file"),
        ("sqlite://host/ops.sqlite3", "use sqlite:///relative"),
    ],
)
def test_malformed_database_urls_are_rejected(tmp_path, url: str, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message.replace("(", r"\(")):
        parse_database_url(url, base_dir=tmp_path)


@pytest.mark.parametrize("raw", ["abc", "1.5", "sixty"])
def test_a_non_integer_conn_max_age_is_rejected_naming_database_url_and_the_option(
    tmp_path, raw: str
) -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_database_url(f"postgres://u@h:5432/d?conn_max_age={raw}", base_dir=tmp_path)
    assert "DATABASE_URL" in str(excinfo.value)
    assert f"conn_max_age={raw!r}" in str(excinfo.value)


def test_a_negative_conn_max_age_is_rejected(tmp_path) -> None:
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL option conn_max_age=-1"):
        parse_database_url("postgres://u@h:5432/d?conn_max_age=-1", base_dir=tmp_path)


def test_a_percent_encoded_unix_socket_host_is_decoded_with_its_case_kept(tmp_path) -> None:
    db = parse_database_url("postgres://%2Fvar%2Frun%2FPostgreSQL/ops_db", base_dir=tmp_path)
    assert db["HOST"] == "/var/run/PostgreSQL"
    assert (db["NAME"], db["PORT"]) == ("ops_db", "")


def test_a_unix_socket_host_may_come_with_credentials(tmp_path) -> None:
    db = parse_database_url("postgres://ops:pw@%2Frun%2Fpg:5433/ops_db", base_dir=tmp_path)
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"]) == ("ops", "pw", "/run/pg", "5433")


def test_an_ipv6_host_loses_its_brackets(tmp_path) -> None:
    db = parse_database_url("postgres://u@[::1]:5432/d", base_dir=tmp_path)
    assert (db["HOST"], db["PORT"]) == ("::1", "5432")


@pytest.mark.parametrize("url", ["postgres://u@h/d", "sqlite:///ops.sqlite3"])
def test_database_connections_are_health_checked_before_reuse(tmp_path, url: str) -> None:
    assert parse_database_url(url, base_dir=tmp_path)["CONN_HEALTH_CHECKS"] is True


def test_a_rejected_database_url_does_not_show_its_password(tmp_path) -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_database_url("postgres://ops:s3cret-pw@h:port/d", base_dir=tmp_path)
    assert "s3cret-pw" not in str(excinfo.value)
    assert "postgres://ops:***@h:port/d" in str(excinfo.value)


# --- whole settings, in a subprocess -------------------------------------------------------------
def _clean_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    return clean_env(tmp_path / "var", **overrides)


def _manage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return manage(tmp_path / "var", *args, timeout=120, **env)


_DUMP_SETTINGS = """
import json
import django
from django.conf import settings
django.setup()
print(json.dumps({
    "engine": settings.DATABASES["default"]["ENGINE"],
    "db_name": settings.DATABASES["default"]["NAME"],
    "cache": settings.CACHES["default"]["BACKEND"],
    "cache_location": settings.CACHES["default"].get("LOCATION"),
    "channels": settings.CHANNEL_LAYERS["default"]["BACKEND"],
    "channel_hosts": settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("hosts"),
    "broker": settings.CELERY_BROKER_URL,
    "debug": settings.DEBUG,
    "allowed_hosts": settings.ALLOWED_HOSTS,
    "conn_health_checks": settings.DATABASES["default"]["CONN_HEALTH_CHECKS"],
}))
"""


def _settings_in_subprocess(tmp_path: Path, **env: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _DUMP_SETTINGS],
        cwd=ROOT,
        env=_clean_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def _production_env() -> dict[str, str]:
    return {
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
        "DJANGO_ALLOWED_HOSTS": "workflow.example.org,ops.example.org",
        "DJANGO_DEBUG": "0",
    }


def test_deploy_check_passes_with_production_variables(tmp_path) -> None:
    result = _manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **_production_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_deploy_check_fails_without_production_variables(tmp_path) -> None:
    result = _manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # The laptop key is recognised as insecure, and the HTTPS-only settings are off without it.
    for warning in ("security.W009", "security.W004", "security.W008", "security.W012"):
        assert warning in output, output


def test_deploy_check_fails_when_only_the_secret_key_is_missing(tmp_path) -> None:
    env = _production_env()
    del env["DJANGO_SECRET_KEY"]
    result = _manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **env)
    assert result.returncode != 0
    assert "security.W009" in result.stdout + result.stderr


def test_deploy_check_fails_when_async_safety_is_switched_off(tmp_path) -> None:
    env = {**_production_env(), "DJANGO_ALLOW_ASYNC_UNSAFE": "true"}
    result = _manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **env)
    assert result.returncode != 0
    assert "async.E001" in result.stdout + result.stderr


def test_deploy_check_fails_with_debug_on(tmp_path) -> None:
    env = {**_production_env(), "DJANGO_DEBUG": "1"}
    result = _manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", **env)
    assert result.returncode != 0
    assert "security.W018" in result.stdout + result.stderr


def test_a_malformed_variable_stops_start_up_naming_it(tmp_path) -> None:
    result = _manage(tmp_path, "check", DJANGO_DEBUG="perhaps")
    assert result.returncode != 0
    assert "DJANGO_DEBUG='perhaps' is not a boolean" in result.stderr


def test_defaults_run_without_any_server(tmp_path) -> None:
    loaded = _settings_in_subprocess(tmp_path)
    assert loaded["engine"] == "django.db.backends.sqlite3"
    assert loaded["db_name"] == str(tmp_path / "var" / "workflow.sqlite3")
    assert loaded["cache"] == "django.core.cache.backends.db.DatabaseCache"
    assert loaded["channels"] == "channels.layers.InMemoryChannelLayer"
    assert loaded["broker"] == "filesystem://"
    assert loaded["debug"] is False
    # The embedded broker's folders exist before any worker starts.
    assert (tmp_path / "var" / "broker" / "queue").is_dir()


def test_production_variables_are_read(tmp_path) -> None:
    loaded = _settings_in_subprocess(tmp_path, **_production_env())
    assert loaded["allowed_hosts"] == ["workflow.example.org", "ops.example.org"]


def test_database_url_postgres_switches_the_engine(tmp_path) -> None:
    loaded = _settings_in_subprocess(
        tmp_path, DATABASE_URL="postgres://ops:secret@db.example.org:5433/opsdb"
    )
    assert loaded["engine"] == "django.db.backends.postgresql"
    assert loaded["db_name"] == "opsdb"
    assert loaded["conn_health_checks"] is True


def test_the_default_database_is_health_checked_too(tmp_path) -> None:
    assert _settings_in_subprocess(tmp_path)["conn_health_checks"] is True


def test_redis_url_switches_cache_and_channel_layer(tmp_path) -> None:
    url = "redis://cache.example.org:6379/3"
    loaded = _settings_in_subprocess(tmp_path, REDIS_URL=url)
    assert loaded["cache"] == "django.core.cache.backends.redis.RedisCache"
    assert loaded["cache_location"] == url
    assert loaded["channels"] == "channels_redis.core.RedisChannelLayer"
    assert loaded["channel_hosts"] == [url]


def test_celery_broker_url_is_taken_as_given(tmp_path) -> None:
    loaded = _settings_in_subprocess(tmp_path, CELERY_BROKER_URL="amqp://guest:guest@mq:5672//")
    assert loaded["broker"] == "amqp://guest:guest@mq:5672//"
    # No embedded-broker folders are made when a real broker is configured.
    assert not (tmp_path / "var" / "broker").exists()
