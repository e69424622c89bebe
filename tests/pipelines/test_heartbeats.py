"""Heartbeats: ``health:{type}:{name}`` = alive with a time to live, in Redis under exactly that
name when REDIS_URL is set, in Django's cache otherwise; and what they tell ``/health``."""

from __future__ import annotations

import time

import pytest

from pipelines import health
from tests.conftest import require_service

REDIS = "redis://127.0.0.1:6379/14"


def _redis_answers() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_store(settings):  # type: ignore[no-untyped-def]
    require_service(_redis_answers(), "needs Redis on 127.0.0.1:6379")
    import redis

    client = redis.Redis.from_url(REDIS)
    client.flushdb()
    settings.REDIS_URL = REDIS
    yield client
    client.flushdb()


def test_behaviour_32_a_heartbeat_is_the_exact_key_with_a_ttl_in_redis(redis_store) -> None:
    health.heartbeat("manager", "packaging", interval=60, counts={"claimed": 2})
    assert redis_store.get("health:manager:packaging") == b"alive"
    assert 85 <= redis_store.ttl("health:manager:packaging") <= 90
    [service] = health.services()
    assert (service.service_type, service.service_name, service.alive) == (
        "manager",
        "packaging",
        True,
    )
    assert service.counts == {"claimed": 2} and service.interval == 60


def test_a_heartbeat_that_is_not_refreshed_expires(redis_store) -> None:
    health.heartbeat("worker", "w1@host", ttl=1)
    assert redis_store.get("health:worker:w1@host") == b"alive"
    time.sleep(1.5)
    assert redis_store.get("health:worker:w1@host") is None
    [service] = health.services()
    assert service.alive is False and service.last_seen


def test_the_heartbeat_thread_refreshes_until_stopped(redis_store) -> None:
    with health.HeartbeatThread("worker", "w2@host", interval=0.3, ttl=1):
        time.sleep(1.6)
        assert redis_store.get("health:worker:w2@host") == b"alive"
    time.sleep(1.3)
    assert redis_store.get("health:worker:w2@host") is None


@pytest.mark.django_db
def test_without_redis_heartbeats_live_in_the_django_cache(settings) -> None:
    from django.core.cache import cache

    settings.REDIS_URL = ""
    cache.clear()
    health.heartbeat("manager", "packaging", interval=60)
    [service] = health.services()
    assert (service.service_name, service.alive, service.lag_seconds) == ("packaging", True, 0.0)


@pytest.mark.django_db
def test_a_heartbeat_never_raises_when_the_cache_is_down(settings, monkeypatch, caplog) -> None:
    def broken() -> None:
        raise ConnectionError("cache down")

    monkeypatch.setattr(health, "store", broken)
    health.heartbeat("manager", "packaging")
    assert any("could not write the heartbeat" in r.getMessage() for r in caplog.records)
