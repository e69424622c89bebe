"""Typed readers for environment variables.

Every helper raises ``ImproperlyConfigured`` naming the variable when a value is malformed, so a
typo in production fails at start-up instead of silently falling back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no)")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default or [])
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = env_str(name, default).lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return value


def env_path(name: str, default: Path) -> Path:
    raw = env_str(name)
    return Path(raw).expanduser().resolve() if raw else default


def parse_database_url(url: str, *, base_dir: Path) -> dict[str, object]:
    """Turn ``sqlite:///path`` or ``postgres://user:pw@host:port/name`` into a DATABASES entry.

    A PostgreSQL Unix-socket directory may be given percent-encoded as the host
    (``postgres://%2Fvar%2Frun%2Fpostgresql/db``); ``?conn_max_age=N`` sets ``CONN_MAX_AGE``
    (seconds, default 60) and every other query parameter becomes a driver option. Every entry
    has ``CONN_HEALTH_CHECKS`` on, so a persistent connection the server dropped is replaced
    before a request reuses it. Error messages never include the password.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    options = dict(parse_qsl(parts.query))
    shown = _without_password(url)
    if scheme == "sqlite":
        raw_path = unquote(parts.path)
        if parts.netloc:
            raise ImproperlyConfigured(
                f"DATABASE_URL {shown!r}: use sqlite:///relative or sqlite:////abs"
            )
        if raw_path in ("", "/"):
            raise ImproperlyConfigured(f"DATABASE_URL {shown!r} names no SQLite file")
        name = raw_path[1:] if raw_path.startswith("/") else raw_path
        path = Path(name)
        if not path.is_absolute():
            path = base_dir / path
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(path),
            "CONN_HEALTH_CHECKS": True,
            # WAL + a busy timeout let the web process and embedded workers share the file.
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    if scheme in ("postgres", "postgresql", "pgsql"):
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured(f"DATABASE_URL {shown!r} names no database")
        try:
            port = parts.port
        except ValueError:
            raise ImproperlyConfigured(f"DATABASE_URL {shown!r} has a malformed port") from None
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": _postgres_host(parts.netloc, parts.hostname),
            "PORT": str(port or ""),
            "CONN_MAX_AGE": _conn_max_age(options.pop("conn_max_age", "60")),
            # Persistent connections (CONN_MAX_AGE > 0) outlive database restarts and
            # failovers; without the check the first request after one fails.
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": options,
        }
    raise ImproperlyConfigured(
        f"DATABASE_URL scheme {parts.scheme!r} is not supported (use sqlite:// or postgres://)"
    )


def _postgres_host(netloc: str, hostname: str | None) -> str:
    """The host as written, percent-decoded: a Unix-socket directory such as
    ``%2Fvar%2Frun%2Fpostgresql`` becomes ``/var/run/postgresql`` (urlsplit's ``hostname``
    neither decodes nor keeps case, and socket paths are case-sensitive)."""
    host = netloc.rpartition("@")[2]
    if host.startswith("["):  # IPv6 literal: urlsplit already strips the brackets
        return hostname or ""
    return unquote(host.partition(":")[0])


def _conn_max_age(raw: str) -> int:
    try:
        seconds = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(
            f"DATABASE_URL option conn_max_age={raw!r} is not an integer number of seconds"
        ) from None
    if seconds < 0:
        raise ImproperlyConfigured(
            f"DATABASE_URL option conn_max_age={seconds} must be at least 0 "
            "(0 closes the connection after each request)"
        )
    return seconds


def _without_password(url: str) -> str:
    """``url`` with any password replaced by ``***``, for error messages that reach logs."""
    parts = urlsplit(url)
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))
