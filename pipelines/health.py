"""Heartbeats of the managers and workers, and what ``/health`` reports about them.

Each running service keeps the key ``health:{service_type}:{service_name}`` = ``alive`` with a
90 s time to live, refreshed every 30 s (ops-db behaviour 32): a service that stops (or is
killed) disappears within 90 s without anyone cleaning up. Beside it, ``health-detail:...``
holds when the service last ticked, its interval and its last counts, so ``/health`` can report
lag. With ``REDIS_URL`` set the keys live in Redis under exactly those names (operators and the
ops-db's own tools read them there); otherwise in Django's cache (a database table by default),
so the embedded demo needs no server.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

log = logging.getLogger(__name__)

HEARTBEAT_TTL = 90
HEARTBEAT_INTERVAL = 30
# The detail outlives the heartbeat so /health can say "last seen 10 minutes ago".
DETAIL_TTL = 24 * 3600


def _key(service_type: str, service_name: str) -> str:
    return f"health:{service_type}:{service_name}"


def _detail_key(service_type: str, service_name: str) -> str:
    return f"health-detail:{service_type}:{service_name}"


class _RedisStore:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def set(self, key: str, value: str, ttl: int) -> None:
        self.client.set(key, value, ex=ttl)

    def get(self, key: str) -> str | None:
        value = self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    def keys(self, prefix: str) -> list[str]:
        return sorted(k.decode() for k in self.client.scan_iter(match=f"{prefix}*", count=500))

    def ttl(self, key: str) -> int | None:
        remaining = self.client.ttl(key)
        return int(remaining) if isinstance(remaining, int) and remaining >= 0 else None


class _CacheStore:
    """Django's cache has no key listing: an index key names the services seen."""

    INDEX = "health-index"

    def set(self, key: str, value: str, ttl: int) -> None:
        from django.core.cache import cache

        cache.set(key, value, ttl)
        index = set(cache.get(self.INDEX) or [])
        if key not in index:
            index.add(key)
            cache.set(self.INDEX, sorted(index), DETAIL_TTL)

    def get(self, key: str) -> str | None:
        from django.core.cache import cache

        value = cache.get(key)
        return value if isinstance(value, str) else None

    def keys(self, prefix: str) -> list[str]:
        from django.core.cache import cache

        return sorted(k for k in cache.get(self.INDEX) or [] if k.startswith(prefix))

    def ttl(self, key: str) -> int | None:
        return None


def store() -> _RedisStore | _CacheStore:
    url = getattr(settings, "REDIS_URL", "") or ""
    return _RedisStore(url) if url else _CacheStore()


def heartbeat(
    service_type: str,
    service_name: str,
    *,
    interval: float | None = None,
    counts: dict[str, int] | None = None,
    ttl: int = HEARTBEAT_TTL,
) -> None:
    """Record that a service is alive now (and, for managers, that it ticked). Never raises: a
    cache outage must not stop the work it reports on."""
    detail = {
        "last_seen": timezone.now().isoformat(),
        "interval": interval,
        "counts": counts or {},
    }
    try:
        target = store()
        target.set(_key(service_type, service_name), "alive", ttl)
        target.set(_detail_key(service_type, service_name), json.dumps(detail), DETAIL_TTL)
    except Exception:
        log.warning(
            "could not write the heartbeat of %s:%s", service_type, service_name, exc_info=True
        )


@dataclass
class ServiceHealth:
    service_type: str
    service_name: str
    alive: bool
    last_seen: str | None
    lag_seconds: float | None
    interval: float | None
    counts: dict[str, int]


def services() -> list[ServiceHealth]:
    """Every service that sent a heartbeat within a day: alive or not, with its lag (seconds
    since its last tick beyond its interval)."""
    target = store()
    now = timezone.now()
    found: list[ServiceHealth] = []
    for key in target.keys("health-detail:"):
        _prefix, service_type, service_name = key.split(":", 2)
        raw = target.get(key)
        try:
            detail = json.loads(raw or "{}")
        except ValueError:
            detail = {}
        last_seen = detail.get("last_seen")
        lag = None
        if last_seen:
            try:
                age = (now - datetime.fromisoformat(last_seen)).total_seconds()
                lag = round(max(age - float(detail.get("interval") or 0), 0.0), 1)
            except (TypeError, ValueError):
                lag = None
        found.append(
            ServiceHealth(
                service_type=service_type,
                service_name=service_name,
                alive=target.get(_key(service_type, service_name)) == "alive",
                last_seen=last_seen,
                lag_seconds=lag,
                interval=detail.get("interval"),
                counts=detail.get("counts") or {},
            )
        )
    return found


class HeartbeatThread:
    """Refreshes a service's heartbeat every ``interval`` seconds until stopped (a worker, or
    any process whose liveness is not tied to ticks)."""

    def __init__(
        self,
        service_type: str,
        service_name: str,
        *,
        interval: float = HEARTBEAT_INTERVAL,
        ttl: int = HEARTBEAT_TTL,
    ) -> None:
        self.service_type = service_type
        self.service_name = service_name
        self.interval = interval
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{service_type}", daemon=True
        )

    def __enter__(self) -> HeartbeatThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from django.db import connection

        try:
            while True:
                started = time.monotonic()
                heartbeat(self.service_type, self.service_name, ttl=self.ttl)
                if self._stop.wait(max(self.interval - (time.monotonic() - started), 0.1)):
                    return
        finally:
            connection.close()


# --- the /health report --------------------------------------------------------------------------
def _check(name: str, probe: Any) -> str:
    try:
        probe()
    except Exception:  # report, never crash the probe; the detail goes to the log only
        log.exception("health: %s check failed", name)
        return "error"
    return "ok"


def _database() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _broker() -> None:
    from workflow_site.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)


def _cache() -> None:
    from django.core.cache import cache

    cache.set("health-probe", "ok", 30)
    if cache.get("health-probe") != "ok":
        raise RuntimeError("the cache did not return what was just stored")


def _failed_counts() -> dict[str, int]:
    from pipelines.models import Status
    from pipelines.services.recovery import OPERATION_MODELS

    counts: dict[str, int] = {}
    for model in OPERATION_MODELS:
        for name in model.PHASES:
            key = model._meta.db_table if name == "status" else f"{model._meta.db_table}.{name}"
            counts[key] = model.objects.filter(**{name: Status.FAILED}).count()
    return counts


def health_report() -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``GET /health``. 503 when the database, the broker or the cache
    does not answer; managers and workers are reported (last tick, lag, alive) but do not make
    the probe fail, so a web process is not taken out of service because beat is down. Only
    states and counts: no host names, addresses or driver messages."""
    from pipelines.managers import MANAGERS

    body: dict[str, Any] = {
        "database": _check("database", _database),
        "broker": _check("broker", _broker),
        "cache": _check("cache", _cache),
    }
    healthy = all(body[k] == "ok" for k in ("database", "broker", "cache"))
    body = {"status": "ok" if healthy else "degraded", **body}
    try:
        seen = {(s.service_type, s.service_name): s for s in services()}
    except Exception:
        log.exception("health: heartbeats could not be read")
        seen = {}
    body["managers"] = {}
    for name in MANAGERS:
        service = seen.get(("manager", name))
        body["managers"][name] = {
            "alive": bool(service and service.alive),
            "last_tick": service.last_seen if service else None,
            "lag_seconds": service.lag_seconds if service else None,
        }
    body["workers_alive"] = sum(
        1 for (kind, _name), s in seen.items() if kind == "worker" and s.alive
    )
    if body["database"] == "ok":
        try:
            body["failed"] = _failed_counts()
        except Exception:
            log.exception("health: failed counts could not be read")
        # Integrity (issue 10): damaged copies and failed repairs are data problems an operator
        # must see, not outages: reported here, never a reason for a 503.
        try:
            from pipelines.services.integrity import integrity_counts

            body["integrity"] = integrity_counts()
        except Exception:
            log.exception("health: integrity counts could not be read")
    return (200 if healthy else 503), body
