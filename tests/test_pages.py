"""The site's own pages and the admin in Debian Chromium: nothing spills sideways on a phone
(390 px) or on a desktop, and every page names its favicon. Plus the pages no browser is needed
for: the favicon file and the styled CSRF failure page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.staticfiles import finders
from django.test import Client

from access import OPERATORS, ensure_groups
from tests import factories as f
from tests.browser import logged_in_context

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1440, "height": 900}
PAGES = ["/", "/admin/", "/admin/pipelines/rawdatapackage/", "/accounts/login/"]


@pytest.fixture
def operator(db: None) -> Any:
    user = f.UserFactory(username="olga_the_operator_of_the_night_shift", is_staff=True)
    user.groups.add(ensure_groups()[OPERATORS])
    return user


@pytest.fixture
def long_rows(db: None) -> None:
    """Rows with long names, so the tables of the home page and the admin are full."""
    for n in range(3):
        f.RawDataPackageFactory(
            name=f"ccat_prime_cam_{n}_2026-12-02T07-48-21_scan_with_a_rather_long_name.tar",
            checksum="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )


@pytest.fixture
def browser(
    live_server: Any, client: Client, operator: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """A Playwright browser context logged in as the operator, pointed at the live server."""
    with logged_in_context(live_server, client, operator, monkeypatch) as context:
        yield context


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_pages_fit_the_screen_width(browser, long_rows, viewport):
    page = browser.new_page()
    page.set_viewport_size(viewport)
    page.set_default_timeout(15_000)
    for path in PAGES:
        response = page.goto(path)
        assert response is not None and response.status == 200, path
        scroll_width, inner_width = page.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert scroll_width <= inner_width, f"{path} is {scroll_width}px wide in {inner_width}px"
        icon = page.locator('link[rel="icon"]').first.get_attribute("href")
        assert icon, f"{path} names no favicon"
        assert page.request.get(icon).status == 200


def test_the_favicon_is_a_static_file():
    assert finders.find("favicon.svg")


@pytest.mark.django_db
def test_favicon_ico_leads_to_the_favicon(client):
    response = client.get("/favicon.ico", follow=True)
    assert response.status_code == 200
    assert response.redirect_chain and response.redirect_chain[0][1] == 301
    assert b"<svg" in b"".join(response.streaming_content)


@pytest.mark.django_db
def test_a_refused_form_says_what_to_do_in_the_site_layout():
    client = Client(enforce_csrf_checks=True)
    response = client.post("/accounts/login/", {"username": "x", "password": "y"})
    assert response.status_code == 403
    body = response.content.decode()
    assert 'class="topbar"' in body
    assert "reload the page" in body.lower()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/accounts/password_reset/",
        "/accounts/password_reset/done/",
        "/accounts/reset/MQ/set-password/",
        "/accounts/reset/done/",
    ],
)
def test_there_are_no_password_reset_pages_that_would_claim_to_send_mail(client, path):
    # The site has no mail backend; a forgotten password is set by an operator instead.
    assert client.get(path).status_code == 404


@pytest.mark.django_db
def test_login_and_password_change_pages_offer_no_reset_by_mail(client, operator):
    for path in ("/accounts/login/", "/admin/login/"):
        body = client.get(path).content.decode().lower()
        assert "password_reset" not in body and "forgotten your password" not in body
    client.force_login(operator)
    assert client.get("/accounts/password_change/").status_code == 200
