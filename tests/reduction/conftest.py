"""Users in each role for the reduction pages, and a logged-in Chromium for browser tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from access import OPERATORS, SCIENTISTS, VIEWERS, instrument_group_name
from tests.conftest import require_service
from tests.factories import GroupFactory, UserFactory

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


def make_user(username: str, *groups: str) -> Any:
    user = UserFactory(username=username)
    user.groups.set([GroupFactory(name=name) for name in groups])
    return user


@pytest.fixture
def cncs_scientist(db: None) -> Any:
    return make_user("cncs_scientist", SCIENTISTS, instrument_group_name("cncs"))


@pytest.fixture
def chai_scientist(db: None) -> Any:
    return make_user("chai_scientist", SCIENTISTS, instrument_group_name("chai"))


@pytest.fixture
def viewer(db: None) -> Any:
    return make_user("viewer", VIEWERS)


@pytest.fixture
def operator(db: None) -> Any:
    return make_user("operator", OPERATORS)


@pytest.fixture
def browser_page(
    live_server: Any, client: Any, cncs_scientist: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """A Playwright page logged in as the CNCS scientist (session cookie copied from the test
    client), pointed at the live server."""
    require_service(
        shutil.which(CHROMIUM) is not None,
        f"needs Debian Chromium at {CHROMIUM} (apt install chromium)",
    )
    # Playwright's sync API runs an event loop in this thread; Django's ORM refuses to run
    # inside one unless told it is fine (the live server runs in its own thread). monkeypatch
    # restores the environment afterwards, so later tests (e.g. the deploy check) never see it.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    client.force_login(cncs_scientist)
    session = client.cookies["sessionid"].value
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=live_server.url)
            context.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
            page = context.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()
            # The test body ran its ORM queries under Playwright's event loop, on connections
            # of their own; close them, or PostgreSQL refuses to drop the test database.
            connections.close_all()
