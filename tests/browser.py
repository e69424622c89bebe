"""Debian's Chromium through Playwright, logged in as a user, pointed at the live server: one
helper for every browser test (skips with a reason without Chromium, fails under
REQUIRE_SERVICES=1)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connections

from tests.conftest import require_service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def logged_in_context(
    live_server: Any, client: Any, user: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """A browser context with ``user``'s session cookie (copied from the test client)."""
    require_service(
        shutil.which(CHROMIUM) is not None,
        f"needs Debian Chromium at {CHROMIUM} (apt install chromium)",
    )
    # Playwright's sync API runs an event loop in this thread; Django's ORM refuses to run
    # inside one unless told it is fine (the live server runs in its own thread). monkeypatch
    # restores the environment afterwards, so later tests (e.g. the deploy check) never see it.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    client.force_login(user)
    session = client.cookies["sessionid"].value
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=live_server.url)
            context.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
            yield context
        finally:
            browser.close()
            # The test body ran its ORM queries under Playwright's event loop, on connections
            # of their own; close them, or PostgreSQL refuses to drop the test database.
            connections.close_all()
