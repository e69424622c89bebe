"""Users in each role for the reduction pages, and a logged-in Chromium for browser tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from access import OPERATORS, SCIENTISTS, VIEWERS, instrument_group_name
from tests.browser import logged_in_context
from tests.factories import GroupFactory, UserFactory


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
    """A Playwright page logged in as the CNCS scientist, pointed at the live server."""
    with logged_in_context(live_server, client, cncs_scientist, monkeypatch) as context:
        page = context.new_page()
        page.set_default_timeout(15_000)
        yield page
