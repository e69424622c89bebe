"""Websocket consumers (live updates). Routes are added by the web UI."""

from __future__ import annotations

from typing import Any

websocket_urlpatterns: list[Any] = []
