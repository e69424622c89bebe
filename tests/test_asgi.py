"""The ASGI application: websocket handshakes from a foreign origin are refused.

There are no websocket routes yet, so a test route (an echo consumer) is added to the live
``websocket_urlpatterns`` list for the duration of a test; the router reads that list on every
connection, so the real application, with its real middleware, routes to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.generic.websocket import WebsocketConsumer
from channels.security.websocket import OriginValidator
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.urls import path

from pipelines.consumers import websocket_urlpatterns
from workflow_site.asgi import application


class _Echo(WebsocketConsumer):
    def connect(self) -> None:
        self.accept()

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.send(text_data=text_data)


@pytest.fixture
def echo_route(transactional_db: None) -> Iterator[str]:
    # The sync consumer runs channels' database_sync_to_async, which closes unusable
    # connections (with CONN_HEALTH_CHECKS it pings them), so it needs real database access.
    route = path("ws/test-echo/", _Echo.as_asgi())
    websocket_urlpatterns.append(route)
    try:
        yield "/ws/test-echo/"
    finally:
        websocket_urlpatterns.remove(route)


@async_to_sync
async def _connect(url: str, headers: list[tuple[bytes, bytes]]) -> tuple[bool, Any]:
    communicator = WebsocketCommunicator(application, url, headers=headers)
    connected, code = await communicator.connect()
    if connected:
        await communicator.send_to(text_data="ping")
        reply = await communicator.receive_from()
        await communicator.disconnect()
        return True, reply
    return False, code


def test_it_accepts_a_websocket_from_an_allowed_host(echo_route: str) -> None:
    connected, reply = _connect(echo_route, [(b"origin", b"http://testserver")])
    assert connected is True
    assert reply == "ping"


@pytest.mark.parametrize(
    "origin", [b"http://evil.example.com", b"https://testserver.evil.example.com"]
)
def test_it_refuses_a_websocket_from_a_foreign_origin(echo_route: str, origin: bytes) -> None:
    connected, _code = _connect(echo_route, [(b"origin", origin)])
    assert connected is False


def test_it_refuses_a_websocket_without_an_origin(echo_route: str) -> None:
    connected, _code = _connect(echo_route, [])
    assert connected is False


def test_it_refuses_a_foreign_origin_before_routing() -> None:
    # No route at this path: without the validator the router raises "No route found".
    connected, _code = _connect("/ws/nowhere/", [(b"origin", b"http://evil.example.com")])
    assert connected is False


def test_it_wraps_the_whole_websocket_stack_in_the_origin_validator() -> None:
    websocket_app = application.application_mapping["websocket"]
    assert isinstance(websocket_app, OriginValidator)
    assert set(websocket_app.allowed_origins) == set(settings.ALLOWED_HOSTS)
    assert "*" not in websocket_app.allowed_origins
