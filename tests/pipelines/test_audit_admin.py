"""The admin's "Audit storage now" and "Measure usage now" on data locations: both go through
their services; a small location is audited at once, a large one is queued for its workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib import messages
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from access import OPERATORS, VIEWERS, ensure_groups
from pipelines.models import DarkFile, DataLocation, DataLocationUsage
from pipelines.services import audit
from tests import factories as f

pytestmark = pytest.mark.django_db
CHANGELIST = "admin:pipelines_datalocation_changelist"


def client_in(group: str) -> Client:
    user = f.UserFactory(is_staff=True)
    user.groups.add(ensure_groups()[group])
    client = Client()
    client.force_login(user)
    return client


def act(client: Client, action: str, location: DataLocation) -> list[tuple[int, str]]:
    response = client.post(
        reverse(CHANGELIST), {"action": action, "_selected_action": [str(location.pk)]}
    )
    return [(m.level, str(m)) for m in get_messages(response.wsgi_request)]


@pytest.fixture
def buffer(tmp_path: Path) -> DataLocation:
    root = tmp_path / "buffer"
    root.mkdir()
    (root / "stray.dat").write_bytes(b"s")
    location: DataLocation = f.DataLocationFactory(
        site=f.SiteFactory(short_name="obs"), name="buffer", root_path=str(root)
    )
    return location


def test_an_operator_audits_a_small_location_at_once_and_reads_the_findings(
    buffer: DataLocation,
) -> None:
    found = act(client_in(OPERATORS), "audit_storage_now", buffer)
    assert found == [
        (
            messages.WARNING,
            "obs:buffer: 1 file(s) seen, 0 known, 1 dark (1 new), 0 no longer dark, "
            "0 lost copy(ies) marked missing, 0 skipped",
        )
    ]
    assert DarkFile.objects.get().relative_path == "stray.dat"


def test_a_large_location_is_queued_on_its_integrity_check_queue(
    buffer: DataLocation,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from pipelines import tasks

    sent: list[tuple[Any, str]] = []
    monkeypatch.setattr(audit, "AUDIT_INLINE_MAX_COPIES", 0)
    monkeypatch.setattr(
        tasks.audit_storage_location,
        "apply_async",
        lambda args, queue: sent.append((args, queue)),
    )
    f.DarkFileFactory(location=buffer)
    with django_capture_on_commit_callbacks(execute=True):
        report = audit.location_audit_request(buffer, actor="test", inline_max=0)
    assert report is None
    assert sent == [((buffer.pk,), "obs_buffer_integrity_check")]
    assert DarkFile.objects.count() == 1  # nothing audited here


def test_the_queued_task_audits_the_location(buffer: DataLocation) -> None:
    from pipelines.tasks import audit_storage_location

    result = audit_storage_location(buffer.pk)
    assert (result["location"], result["dark_new"]) == ("obs:buffer", 1)


def test_an_unreachable_location_is_reported_not_audited(
    buffer: DataLocation, tmp_path: Path
) -> None:
    DataLocation.objects.filter(pk=buffer.pk).update(root_path=str(tmp_path / "gone"))
    [(level, text)] = act(client_in(OPERATORS), "audit_storage_now", buffer)
    assert level == messages.ERROR and text.startswith("obs:buffer: not audited:")
    assert not DarkFile.objects.exists()


def test_an_operator_measures_usage_now(buffer: DataLocation) -> None:
    [(level, text)] = act(client_in(OPERATORS), "measure_usage_now", buffer)
    assert level == messages.SUCCESS and "accepting writes" in text
    assert DataLocationUsage.objects.filter(location=buffer).count() == 1


def test_a_viewer_is_not_offered_the_actions(buffer: DataLocation) -> None:
    act(client_in(VIEWERS), "audit_storage_now", buffer)
    assert not DarkFile.objects.exists()
