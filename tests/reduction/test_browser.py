"""The configuration page in Debian Chromium: fill, preview, save, reset, diff."""

from __future__ import annotations

from typing import Any

import pytest

from reduction.instruments import get_instrument
from reduction.models import ParameterSet

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_scientist_previews_saves_resets_and_compares(browser_page: Any) -> None:
    page = browser_page
    page.goto("/reduction/cncs/")
    assert page.locator("h1").inner_text() == get_instrument("cncs").label

    # An invalid mask is caught by the preview, next to the field.
    page.fill("#id_mask", "Bank=99")
    page.click("#preview-button")
    page.wait_for_selector('[data-errors-for="mask"] li')
    assert "above the largest allowed value 50" in page.inner_text('[data-errors-for="mask"]')

    # A valid change previews the script without saving it.
    page.fill("#id_mask", "Bank=36-50\nPixel=1-8,121-128")
    page.fill("#id_e_min", "-0.25")
    page.click("#preview-button")
    page.wait_for_selector("#preview-script:has-text('E_MIN = -0.25')")
    assert "MASK = [{'bank': '36-50'}, {'pixel': '1-8,121-128'}]" in page.inner_text(
        "#preview-script"
    )
    assert not ParameterSet.objects.exists()

    # Save: the confirmation shows the path and checksum of the installed script.
    page.fill("#id_comment", "beam stop")
    page.click("#save-button")
    page.wait_for_selector(".messages .success")
    v1 = ParameterSet.objects.get()
    confirmation = page.inner_text(".messages")
    assert "version 1" in confirmation
    assert str(get_instrument("cncs").script_path()) in confirmation
    assert v1.script_checksum in confirmation
    assert page.input_value("#id_e_min") == "-0.25"

    # A preview after the save shows what would change against the saved version.
    page.fill("#id_e_max", "0.9")
    page.click("#preview-button")
    page.wait_for_selector("#preview-diff-title:has-text('Changes against version 1')")
    assert "-E_MAX = 0.95" in page.inner_text("#preview-diff")
    assert page.is_visible("#preview-diff .add:has-text('+E_MAX = 0.9')")
    assert "as version 2" in page.inner_text("#preview-checksum")
    assert ParameterSet.objects.count() == 1

    # Reset to defaults (after confirming the dialog) saves version 2.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#reset-button")
    page.wait_for_selector(".messages .success:has-text('version 2')")
    assert page.input_value("#id_e_min") == "-0.2"

    # History: compare the two versions.
    page.click("text=History and diffs")
    page.wait_for_selector("#version-2")
    page.check('input[name="a"][value="1"]')
    page.check('input[name="b"][value="2"]')
    page.click("#compare-button")
    page.wait_for_selector("#diff-title")
    assert "version 1 → version 2" in page.inner_text("#diff-title")
    assert page.is_visible('#diff-values tr[data-key="e_min"]')
    assert not page.is_visible('#diff-values tr[data-key="grouping_file"]')  # unchanged: hidden
    assert "+E_MIN = -0.2" in page.inner_text("#script-diff")
    page.uncheck("#only-changed")
    assert page.is_visible('#diff-values tr[data-key="grouping_file"]')


def test_errors_are_summarised_on_top_and_failed_previews_say_why(browser_page: Any) -> None:
    page = browser_page
    page.goto("/reduction/cncs/")

    # A refused preview: the summary at the top of the form, the first bad field focused.
    page.fill("#id_mask", "Bank=99")
    page.fill("#id_e_min", "1_0")
    page.click("#preview-button")
    page.wait_for_selector("#error-summary:visible")
    assert "Emin: Enter a number: '1_0' is not a number" in page.inner_text("#error-summary")
    assert page.evaluate("document.activeElement.id") == "id_e_min"
    summary_top = page.locator("#error-summary").bounding_box()["y"]
    assert summary_top < page.locator("#id_vanadium_file").bounding_box()["y"]

    # A good preview, then one with a stale CSRF token: the old preview is cleared.
    page.fill("#id_mask", "Bank=36-50")
    page.fill("#id_e_min", "-0.25")
    page.click("#preview-button")
    page.wait_for_selector("#preview-script:has-text('E_MIN = -0.25')")
    assert not page.is_visible("#error-summary")
    page.evaluate(
        "document.querySelector('#config-form [name=csrfmiddlewaretoken]').value = 'x'.repeat(64)"
    )
    page.click("#preview-button")
    page.wait_for_selector("#preview-error:has-text('The page is out of date: reload it')")
    assert page.inner_text("#preview-script") == ""
    assert "The page is out of date" in page.inner_text("#error-summary")

    # The session expires: the preview says so instead of "Unexpected token '<'".
    page.context.clear_cookies()
    page.click("#preview-button")
    page.wait_for_selector("#preview-error:has-text('Your session has expired: log in again')")
    assert page.inner_text("#preview-script") == ""
    assert not ParameterSet.objects.exists()


def test_a_number_too_large_stays_as_typed_with_the_reason(browser_page: Any) -> None:
    page = browser_page
    page.goto("/reduction/cncs/")
    page.fill("#id_incident_energy_mev", "1e999")
    page.click("#save-button")
    page.wait_for_selector("#save-error:has-text('Not saved')")
    assert page.input_value("#id_incident_energy_mev") == "1e999"
    assert "1e999 is out of range" in page.inner_text('[data-errors-for="incident_energy_mev"]')
    assert page.evaluate("document.activeElement.id") == "id_incident_energy_mev"
    assert not ParameterSet.objects.exists()
