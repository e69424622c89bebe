"""The configuration pages over HTTP: who may see, who may change, what a save shows."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from reduction.instruments import get_instrument
from reduction.models import ParameterSet, PropertyModification, ReductionProperty
from reduction.services import reduction_config_current, reduction_config_update

pytestmark = pytest.mark.django_db


def post_data(key: str, **changes: Any) -> dict[str, Any]:
    """What the browser sends for the current values with ``changes``."""
    form = get_instrument(key).form_class.from_values(reduction_config_current(key))
    data = {k: v for k, v in form.data.items()}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def test_anonymous_users_are_sent_to_log_in(client: Any) -> None:
    for name in ("configure", "history"):
        response = client.get(reverse(f"reduction:{name}", args=["cncs"]))
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    response = client.post(reverse("reduction:configure", args=["cncs"]), post_data("cncs"))
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert not ParameterSet.objects.exists()


def test_unknown_instrument_is_404(client: Any, viewer: Any) -> None:
    client.force_login(viewer)
    assert client.get("/reduction/lrs/").status_code == 404


def test_viewer_sees_current_values_read_only(client: Any, viewer: Any) -> None:
    reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_min": -0.15}, user=None
    )
    client.force_login(viewer)

    page = client.get(reverse("reduction:configure", args=["cncs"])).content.decode()

    assert 'value="-0.15"' in page  # stored value, not the default -0.2
    assert "Read only" in page and "scientists_cncs" in page
    assert 'id="save-button"' not in page
    assert "disabled" in page


def test_an_unchecked_box_is_saved_as_false_and_shown_unchecked(
    client: Any, cncs_scientist: Any
) -> None:
    client.force_login(cncs_scientist)
    client.post(reverse("reduction:configure", args=["cncs"]), post_data("cncs", do_tib=None))
    assert ReductionProperty.objects.get(instrument="cncs", key="do_tib").value is False
    page = client.get(reverse("reduction:configure", args=["cncs"])).content.decode()
    assert 'name="do_tib" id="id_do_tib"' in page
    assert 'name="do_tib" id="id_do_tib" checked' not in page


@pytest.mark.parametrize("who", ["viewer", "chai_scientist"])
def test_users_who_may_not_change_get_403_and_nothing_changes(
    client: Any, request: pytest.FixtureRequest, who: str
) -> None:
    client.force_login(request.getfixturevalue(who))
    url = reverse("reduction:configure", args=["cncs"])

    assert client.post(url, post_data("cncs", e_min="-0.1")).status_code == 403
    assert client.post(reverse("reduction:reset", args=["cncs"])).status_code == 403
    assert not ParameterSet.objects.exists()
    assert not ReductionProperty.objects.exists()
    assert not get_instrument("cncs").script_path().exists()


def test_scientist_saves_and_sees_path_and_checksum(client: Any, cncs_scientist: Any) -> None:
    client.force_login(cncs_scientist)
    url = reverse("reduction:configure", args=["cncs"])

    response = client.post(
        url,
        post_data("cncs", mask="Bank=36-50\nPixel=1-8,121-128", comment="beam stop"),
        follow=True,
    )

    ps = ParameterSet.objects.get()
    assert response.redirect_chain == [(url, 302)]
    page = response.content.decode()
    assert f"Saved {get_instrument('cncs').label} version 1" in page
    assert str(get_instrument("cncs").script_path()) in page
    assert ps.script_checksum in page
    assert ps.author == cncs_scientist and ps.comment == "beam stop"
    assert ps.values["mask"] == [{"bank": "36-50"}, {"pixel": "1-8,121-128"}]
    assert "matches version 1" in page


def test_operator_may_change_every_instrument(client: Any, operator: Any) -> None:
    client.force_login(operator)
    response = client.post(reverse("reduction:configure", args=["chai"]), post_data("chai"))
    assert response.status_code == 302
    assert ParameterSet.objects.get().instrument == "chai"


def test_invalid_values_rerender_with_errors_next_to_fields(
    client: Any, cncs_scientist: Any
) -> None:
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]),
        post_data("cncs", e_min="0.5", e_max="0.2", mask="Bank=99", vanadium_file="van.nxs"),
    )

    assert response.status_code == 200
    form = response.context["form"]
    assert form.errors["e_max"] == ["Emax must be larger than Emin"]
    assert "99 is above the largest allowed value 50" in form.errors["mask"][0]
    assert form.errors["vanadium_file"] == ["must be an absolute path starting with /"]
    page = response.content.decode()
    assert 'data-field="mask"' in page and "Not saved" in page
    assert not ParameterSet.objects.exists() and not PropertyModification.objects.exists()


def test_a_write_failure_is_shown_with_the_exact_error(
    client: Any, cncs_scientist: Any, settings: Any, tmp_path: Any
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    settings.REDUCTION_SCRIPT_DIR = blocker
    client.force_login(cncs_scientist)

    response = client.post(reverse("reduction:configure", args=["cncs"]), post_data("cncs"))

    assert response.status_code == 200
    assert "Not saved, nothing changed: cannot" in response.content.decode()
    assert "Not a directory" in response.content.decode()
    assert not ParameterSet.objects.exists()


def test_preview_returns_the_script_without_saving(client: Any, viewer: Any) -> None:
    client.force_login(viewer)
    url = reverse("reduction:preview", args=["chai"])

    ok = client.post(url, post_data("chai", baseline_order="3")).json()
    bad = client.post(url, post_data("chai", baseline_order="9"))

    assert ok["ok"] and "BASELINE_ORDER = 3\n" in ok["script"] and len(ok["checksum"]) == 64
    assert bad.status_code == 400
    assert "less than or equal to 5" in bad.json()["errors"]["baseline_order"][0]
    assert not ParameterSet.objects.exists()
    assert client.get(url).status_code == 405


def test_reset_saves_defaults_and_confirms(client: Any, cncs_scientist: Any) -> None:
    reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_step": 0.01}, user=None
    )
    client.force_login(cncs_scientist)

    response = client.post(reverse("reduction:reset", args=["cncs"]), follow=True)

    latest = ParameterSet.objects.latest_for("cncs")
    assert latest is not None and latest.number == 2 and latest.action == "reset"
    assert reduction_config_current("cncs") == get_instrument("cncs").defaults()
    assert "version 2 (changed: e_step)" in response.content.decode()


def test_history_and_diff(client: Any, viewer: Any) -> None:
    values = reduction_config_current("cncs")
    reduction_config_update("cncs", values=values, user=None, comment="start")
    reduction_config_update("cncs", values=values | {"e_max": 0.8}, user=None)
    client.force_login(viewer)

    history = client.get(reverse("reduction:history", args=["cncs"])).content.decode()
    diff = client.get(reverse("reduction:diff", args=["cncs"]), {"a": 2, "b": 1})

    assert 'id="version-2"' in history and 'id="version-1"' in history and "start" in history
    assert "<code>e_max</code>: <code>0.95</code> → <code>0.8</code>" in history
    assert diff.status_code == 200
    page = diff.content.decode()
    assert "version 1 → version 2" in page and "1 value changed" in page
    assert '<span class="del">-E_MAX = 0.95</span>' in page
    assert '<span class="add">+E_MAX = 0.8</span>' in page
    assert client.get(reverse("reduction:diff", args=["cncs"]), {"a": 1, "b": 9}).status_code == 404


def test_index_lists_every_instrument(client: Any, cncs_scientist: Any) -> None:
    client.force_login(cncs_scientist)
    page = client.get(reverse("reduction:index")).content.decode()
    for key in ("chai", "primecam", "cncs"):
        assert reverse("reduction:configure", args=[key]) in page


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("flag_pixels", "9" * 5000, "at most 2000 characters"),
        ("flag_pixels", "9" * 40, "too large"),
        ("flag_pixels", ",".join(["1-63"] * 200_000), "at most 2000 characters"),
        ("baseline_order", "9" * 5000, "is out of range (at least 0 and at most 5)"),
        ("tsys_max_k", "1e400", "1e400 is out of range (at least 10 and at most 50000)"),
        ("line_window_kms", "nan, 1", "'nan' is not a finite number"),
    ],
)
def test_huge_and_non_finite_values_are_field_errors_and_change_nothing(
    client: Any, chai_scientist: Any, field: str, value: str, message: str
) -> None:
    client.force_login(chai_scientist)
    response = client.post(
        reverse("reduction:configure", args=["chai"]), post_data("chai", **{field: value})
    )
    assert response.status_code == 200
    assert message in response.context["form"].errors[field][0]
    assert not ParameterSet.objects.exists() and not ReductionProperty.objects.exists()
    assert not get_instrument("chai").script_path().exists()


@pytest.mark.parametrize(
    ("comment", "message"), [("x" * 501, "at most 500 characters"), ("a\x00b", "NUL character")]
)
def test_a_bad_comment_is_shown_next_to_the_comment_and_changes_nothing(
    client: Any, cncs_scientist: Any, comment: str, message: str
) -> None:
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]), post_data("cncs", comment=comment)
    )
    assert response.status_code == 200
    assert message in response.context["comment_errors"][0]
    page = response.content.decode()
    assert '<div class="field has-error" data-field="comment">' in page
    assert not ParameterSet.objects.exists() and not ReductionProperty.objects.exists()


def test_a_field_without_a_stored_row_shows_its_default(client: Any, viewer: Any) -> None:
    # As after a release that added e_step: rows for every other key, none for it.
    values = reduction_config_current("cncs") | {"e_min": -0.15}
    for key, value in values.items():
        if key != "e_step":
            ReductionProperty.objects.create(instrument="cncs", key=key, value=value)
    client.force_login(viewer)

    form = client.get(reverse("reduction:configure", args=["cncs"])).context["form"]

    assert form["e_min"].value() == -0.15
    assert form["e_step"].value() == get_instrument("cncs").defaults()["e_step"]


def test_a_second_row_for_the_same_key_is_refused_by_the_database() -> None:
    from django.db import IntegrityError, transaction

    ReductionProperty.objects.create(instrument="cncs", key="e_min", value=-0.2)
    with pytest.raises(IntegrityError), transaction.atomic():
        ReductionProperty.objects.create(instrument="cncs", key="e_min", value=-0.3)
    assert ReductionProperty.objects.get(instrument="cncs", key="e_min").value == -0.2


@pytest.fixture
def template_with_missing_key(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """CNCS with a template that asks for a key its form does not define."""
    import dataclasses

    instrument = get_instrument("cncs")
    (tmp_path / instrument.template_name).write_text("X = {{ no_such_key }}\n")
    patched = dataclasses.replace(instrument, package_dir=tmp_path)
    for where in ("reduction.services.get_instrument", "reduction.views.get_instrument"):
        monkeypatch.setattr(where, lambda key: patched)


def test_a_template_error_is_shown_on_the_page_and_in_the_preview(
    client: Any, cncs_scientist: Any, template_with_missing_key: None
) -> None:
    client.force_login(cncs_scientist)

    response = client.post(reverse("reduction:configure", args=["cncs"]), post_data("cncs"))
    preview = client.post(reverse("reduction:preview", args=["cncs"]), post_data("cncs"))

    assert response.status_code == 200
    assert (
        "Not saved, nothing changed: reduce_CNCS.py.j2: UndefinedError: "
        "&#x27;no_such_key&#x27; is undefined" in response.content.decode()
    )
    assert preview.status_code == 422
    assert "'no_such_key' is undefined" in preview.json()["error"]
    assert not ParameterSet.objects.exists() and not ReductionProperty.objects.exists()
    assert not get_instrument("cncs").script_path().exists()


def test_preview_shows_the_version_a_save_would_make_and_its_diff(
    client: Any, cncs_scientist: Any
) -> None:
    url = reverse("reduction:preview", args=["cncs"])
    client.force_login(cncs_scientist)
    first = client.post(url, post_data("cncs", e_min="-0.25")).json()
    assert (first["version"], first["against"], first["diff"]) == (1, None, [])

    v1 = reduction_config_update(
        "cncs", values=reduction_config_current("cncs"), user=None
    ).parameter_set
    same = client.post(url, post_data("cncs")).json()
    changed = client.post(url, post_data("cncs", e_min="-0.25")).json()

    assert (same["version"], same["against"], same["diff"]) == (1, 1, [])
    assert same["checksum"] == v1.script_checksum  # what a save would install, byte for byte
    assert (changed["version"], changed["against"]) == (2, 1)
    lines = {(line["kind"], line["text"]) for line in changed["diff"]}
    assert ("del", "-E_MIN = -0.2") in lines and ("add", "+E_MIN = -0.25") in lines
    assert ("meta", "--- v1") in lines and ("meta", "+++ preview") in lines
    assert ParameterSet.objects.count() == 1

    saved = reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_min": -0.25}, user=None
    )
    assert saved.checksum == changed["checksum"]


def test_the_first_save_shows_and_lists_only_what_differs_from_the_defaults(
    client: Any, cncs_scientist: Any
) -> None:
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]), post_data("cncs", e_min="-0.1"), follow=True
    )
    assert "Saved " + get_instrument("cncs").label + " version 1 (changed: e_min)." in (
        response.content.decode()
    )
    history = client.get(reverse("reduction:history", args=["cncs"])).content.decode()
    assert history.count("<li><code>") == 1 and "<code>e_min</code>" in history


def test_a_preview_without_a_session_is_a_json_error_saying_so(client: Any) -> None:
    response = client.post(reverse("reduction:preview", args=["cncs"]), post_data("cncs"))
    assert response.status_code == 401
    assert response.json() == {
        "ok": False,
        "error": "Your session has expired: log in again (reload the page) to preview.",
        "reason": "login",
    }


def test_a_preview_with_a_stale_csrf_token_is_a_json_error_saying_so(cncs_scientist: Any) -> None:
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(cncs_scientist)
    url = reverse("reduction:preview", args=["cncs"])
    response = client.post(url, post_data("cncs", csrfmiddlewaretoken="stale" * 8))
    assert response.status_code == 403
    assert response.json()["error"].startswith("The page is out of date: reload it")
    # With the page's token the same request previews.
    client.get(reverse("reduction:configure", args=["cncs"]))
    token = client.cookies["csrftoken"].value
    response = client.post(url, post_data("cncs", csrfmiddlewaretoken=token))
    assert response.status_code == 200 and response.json()["ok"] is True
    assert not ParameterSet.objects.exists()


def test_a_refused_save_summarises_the_errors_at_the_top_of_the_form(
    client: Any, cncs_scientist: Any
) -> None:
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]), post_data("cncs", e_min="x", mask="Bank=99")
    )
    page = response.content.decode()
    form_start = page.index('id="config-form"')
    summary = page.index('id="error-summary"')
    assert form_start < summary < page.index('data-field="vanadium_file"')
    assert '<a href="#id_e_min">Emin</a>: Enter a number' in page
    assert '<a href="#id_mask">' in page
