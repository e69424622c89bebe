"""When the script file changes relative to the database commit: inside a caller's transaction
only when that commits, never on its rollback; after a failed commit the previous script is put
back under the instrument's lock; late commit hooks never install an older version."""

from __future__ import annotations

import logging
import threading
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from reduction import services
from reduction.errors import ScriptWriteError
from reduction.instruments import get_instrument
from reduction.models import ParameterSet, PropertyModification, ReductionProperty
from reduction.services import reduction_config_current, reduction_config_update
from tests.reduction.test_views import post_data

SCRIPT = get_instrument("cncs").script_path


class Rollback(Exception):
    """Raised by a test to roll its transaction back."""


def snapshot() -> tuple[object, ...]:
    path = SCRIPT()
    return (
        list(ReductionProperty.objects.values_list("instrument", "key", "value")),
        PropertyModification.objects.count(),
        list(ParameterSet.objects.values_list("instrument", "number")),
        path.read_bytes() if path.exists() else None,
        sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else [],
    )


def save(**changes: Any) -> services.ConfigWriteResult:
    return reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | changes, user=None
    )


# --- Inside a caller's transaction ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_save_in_a_transaction_that_rolls_back_leaves_the_previous_script() -> None:
    first = save()
    before = snapshot()

    with pytest.raises(Rollback), transaction.atomic():
        result = save(e_min=0.0)
        assert (result.parameter_set.number, result.pending) == (2, True)
        assert SCRIPT().read_text() == first.parameter_set.script_text  # not before the commit
        raise Rollback

    assert snapshot() == before


@pytest.mark.django_db(transaction=True)
def test_a_first_save_in_a_transaction_that_rolls_back_leaves_no_script() -> None:
    with pytest.raises(Rollback), transaction.atomic():
        save()
        raise Rollback

    assert not ParameterSet.objects.exists() and not ReductionProperty.objects.exists()
    assert not SCRIPT().exists()
    assert not list(SCRIPT().parent.glob(".*"))  # the write check left no temporary file


@pytest.mark.django_db(transaction=True)
def test_a_save_in_a_transaction_installs_its_script_when_that_commits() -> None:
    first = save()

    with transaction.atomic():
        result = save(e_min=0.0)
        assert SCRIPT().read_text() == first.parameter_set.script_text

    assert SCRIPT().read_text() == result.parameter_set.script_text
    assert ParameterSet.objects.latest_for("cncs") == result.parameter_set
    assert sorted(p.name for p in SCRIPT().parent.iterdir()) == ["reduce_CNCS.py"]


@pytest.mark.django_db(transaction=True)
def test_an_unwritable_script_is_reported_inside_the_callers_transaction_and_saves_nothing(
    settings: Any, tmp_path: Path
) -> None:
    save()
    before = snapshot()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the script directory should be")

    with transaction.atomic():
        settings.REDUCTION_SCRIPT_DIR = blocker
        with pytest.raises(ScriptWriteError, match=r"not-a-directory/cncs/reduce_CNCS\.py"):
            save(e_min=0.0)
        settings.REDUCTION_SCRIPT_DIR = tmp_path / "reduction_scripts"
        # The caller's transaction goes on and commits; the failed save is not part of it.

    assert snapshot() == before
    assert blocker.read_text() == "a file where the script directory should be"


@pytest.mark.django_db
def test_commit_hooks_that_run_out_of_order_leave_the_latest_script(
    django_capture_on_commit_callbacks: Any,
) -> None:
    first = save()
    with django_capture_on_commit_callbacks() as hooks:
        with transaction.atomic():
            save(e_min=0.0)
        with transaction.atomic():
            third = save(e_min=0.1)
    assert SCRIPT().read_text() == first.parameter_set.script_text
    # Only the script installs; a new parameter set also queues the products' staleness refresh.
    hooks = [hook for hook in hooks if "_place_script" in hook.__qualname__]
    assert len(hooks) == 2

    hooks[1]()  # the newer save's hook first ...
    assert SCRIPT().read_text() == third.parameter_set.script_text
    hooks[0]()  # ... the older one late: it must not put its version back
    assert SCRIPT().read_text() == third.parameter_set.script_text


@pytest.mark.django_db
def test_a_late_install_that_fails_is_logged_and_the_next_save_installs_the_script(
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = save()
    with django_capture_on_commit_callbacks() as hooks, transaction.atomic():
        second = save(e_min=0.0)

    def failing_replace(src: str, dst: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(services.os, "replace", failing_replace)
    with caplog.at_level(logging.ERROR, logger="reduction.services"):
        (hook,) = [hook for hook in hooks if "_place_script" in hook.__qualname__]
        hook()  # the caller's transaction has committed: logged, not raised
    monkeypatch.undo()

    assert "cncs: the saved reduction parameters were committed but" in caplog.text
    assert "Read-only file system" in caplog.text
    assert SCRIPT().read_text() == first.parameter_set.script_text
    again = save(e_min=0.0)
    assert (again.created, again.parameter_set) == (False, second.parameter_set)
    assert SCRIPT().read_text() == second.parameter_set.script_text


# --- Outside any transaction: the page and the command -------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_page_and_the_command_install_the_script_before_they_answer(
    client: Any, cncs_scientist: Any
) -> None:
    client.force_login(cncs_scientist)
    response = client.post(
        reverse("reduction:configure", args=["cncs"]), post_data("cncs", e_min="-0.1")
    )
    assert response.status_code == 302
    v1 = ParameterSet.objects.get()
    assert SCRIPT().read_text() == v1.script_text

    out = StringIO()
    call_command("reduction_config", "set", "cncs", "e_min=-0.3", stdout=out)
    v2 = ParameterSet.objects.latest_for("cncs")
    assert v2 is not None and v2.number == 2
    assert SCRIPT().read_text() == v2.script_text
    assert f"wrote {SCRIPT()} sha256 {v2.script_checksum}" in out.getvalue()


# --- The undo after a failed commit --------------------------------------------------------------


def fail_commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every commit of this thread's connection fails (other threads commit as usual). Returns
    the list the failures are noted in."""
    failures: list[str] = []

    def failing_commit(*args: object, **kwargs: object) -> None:
        failures.append("commit")
        raise DatabaseError("database went away at commit")

    monkeypatch.setattr(connection, "commit", failing_commit)
    return failures


@pytest.mark.django_db(transaction=True)
def test_the_undo_after_a_failed_commit_runs_holding_the_instruments_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = save()
    before = snapshot()
    seen: list[tuple[bool, str]] = []
    undo = services._Installed.undo

    def watched_undo(self: services._Installed) -> None:
        seen.append((connection.in_atomic_block, queries.captured_queries[-1]["sql"]))
        undo(self)

    monkeypatch.setattr(services._Installed, "undo", watched_undo)
    fail_commits(monkeypatch)
    with CaptureQueriesContext(connection) as queries, pytest.raises(DatabaseError):
        save(e_min=0.0)
    monkeypatch.undo()

    ((in_transaction, last_query),) = seen
    assert in_transaction and '"reduction_config_lock"' in last_query
    if connection.vendor == "postgresql":
        assert last_query.endswith("FOR UPDATE")
    assert SCRIPT().read_text() == first.parameter_set.script_text
    assert snapshot() == before


@pytest.mark.django_db(transaction=True)
def test_a_save_made_while_a_failed_commit_is_undone_keeps_its_script(
    require_postgres: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's commit fails; while A puts its previous script back, B saves. B must wait for A's
    undo (it holds the lock), so B's script, not A's old one, is on disk at the end."""
    save()
    errors: list[BaseException] = []

    def save_b() -> None:
        try:
            save(e_min=-0.3)
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)
        finally:
            connection.close()

    b = threading.Thread(target=save_b)
    write = services._atomic_write

    def write_with_b_in_between(path: Path, content: bytes) -> None:
        # Only A's undo (this thread, after its commit failed) lets B run here, between the
        # undo's "is the file still ours" check and its write.
        if threading.current_thread() is b or not failures or b.ident is not None:
            return write(path, content)
        b.start()
        b.join(timeout=2)  # B finishes unless the lock makes it wait
        return write(path, content)

    monkeypatch.setattr(services, "_atomic_write", write_with_b_in_between)
    failures = fail_commits(monkeypatch)
    with pytest.raises(DatabaseError):
        save(e_min=0.0)
    monkeypatch.undo()
    b.join(timeout=30)

    assert b.ident is not None and not errors, errors
    latest = ParameterSet.objects.latest_for("cncs")
    assert latest is not None and (latest.number, latest.values["e_min"]) == (2, -0.3)
    assert SCRIPT().read_text() == latest.script_text
