"""Viewers and scientists are not staff: they log in through the site's own login page."""

import pytest

from access import VIEWERS, ensure_groups
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_a_non_staff_viewer_logs_in_and_sees_the_overview(client):
    ensure_groups()
    viewer = UserFactory(username="ada", password="s3cret-pass-word")
    viewer.groups.add(*[g for name, g in ensure_groups().items() if name == VIEWERS])

    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")

    response = client.post(
        "/accounts/login/?next=/", {"username": "ada", "password": "s3cret-pass-word", "next": "/"}
    )
    assert response.status_code == 302 and response["Location"] == "/"
    page = client.get("/")
    assert page.status_code == 200 and b"Overview" in page.content


def test_a_wrong_password_is_refused_with_a_message(client):
    UserFactory(username="bob", password="right-password-1")
    response = client.post("/accounts/login/", {"username": "bob", "password": "wrong"})
    assert response.status_code == 200
    assert b"Please enter a correct" in response.content
    assert "_auth_user_id" not in client.session


def test_logout_is_a_post_and_ends_the_session(client):
    user = UserFactory()
    client.force_login(user)
    assert client.post("/accounts/logout/").status_code == 302
    assert "_auth_user_id" not in client.session


def test_a_forbidden_change_shows_why_on_the_403_page(client):
    from tests.factories import UserFactory as Users

    client.force_login(Users(username="outsider"))
    response = client.post("/reduction/cncs/reset/")
    assert response.status_code == 403
    body = response.content.decode()
    assert "Not allowed" in body and "cncs" in body.lower()


def test_a_step_naming_an_unknown_reduction_instrument_is_invalid():
    from django.core.exceptions import ValidationError

    from tests.factories import ReductionStepFactory

    step = ReductionStepFactory.build(reduction_instrument="nosuch")
    with pytest.raises(ValidationError, match="unknown instrument 'nosuch'; known: chai, cncs"):
        step.clean()
    step.reduction_instrument = "cncs"
    step.clean()


def test_the_overview_counts_packages_per_state(client):
    from tests.factories import RawDataPackageFactory

    RawDataPackageFactory.create_batch(2)
    RawDataPackageFactory(state="failed")
    client.force_login(UserFactory())
    body = client.get("/").content.decode()
    assert "<h2>2</h2><p>packages waiting" in body
    assert "<h2>1</h2><p>packages failed" in body
    assert "<h2>0</h2><p>packages archived" in body
