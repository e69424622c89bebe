"""reduction_config_update and friends: what a save stores, audits and writes, and that every
failure changes nothing."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import DatabaseError, connection, transaction

from reduction import services
from reduction.errors import InvalidParameters, ScriptWriteError
from reduction.instruments import UnknownInstrument, get_instrument
from reduction.models import (
    ImmutableRowError,
    ParameterSet,
    PropertyModification,
    ReductionProperty,
)
from reduction.rendering import ScriptRenderError
from reduction.services import (
    reduction_config_current,
    reduction_config_diff,
    reduction_config_render,
    reduction_config_reset,
    reduction_config_update,
)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def snapshot(key: str = "cncs") -> tuple[object, ...]:
    path = get_instrument(key).script_path()
    return (
        list(ReductionProperty.objects.values_list("instrument", "key", "value")),
        PropertyModification.objects.count(),
        list(ParameterSet.objects.values_list("instrument", "number")),
        path.read_bytes() if path.exists() else None,
    )


def test_first_save_stores_every_key_writes_the_script_and_returns_its_checksum() -> None:
    user = UserFactory()
    values = reduction_config_current("cncs") | {"e_min": -0.1}

    result = reduction_config_update("cncs", values=values, user=user, comment="first")

    script = result.path.read_text()
    assert result.path == Path(get_instrument("cncs").output_dir()) / "reduce_CNCS.py"
    assert result.checksum == hashlib.sha256(script.encode()).hexdigest()
    assert "E_MIN = -0.1\n" in script
    assert "PARAMETER_SET = {'instrument': 'cncs'" in script and "'version': 1}" in script
    ps = result.parameter_set
    assert (ps.number, ps.author, ps.comment, ps.values["e_min"]) == (1, user, "first", -0.1)
    assert ps.script_text == script and ps.script_checksum == result.checksum
    assert ReductionProperty.objects.filter(instrument="cncs").count() == len(values)
    assert reduction_config_current("cncs") == values
    assert not list(result.path.parent.glob(".*tmp"))  # no temporary file left behind


def test_changing_one_value_writes_one_audit_row_with_old_and_new_value() -> None:
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    values = reduction_config_current("cncs")
    reduction_config_update("cncs", values=values, user=alice)

    result = reduction_config_update(
        "cncs", values=values | {"mask": [{"bank": "36-50"}]}, user=bob, comment="beam stop"
    )

    assert result.changed_keys == ["mask"]
    (mod,) = PropertyModification.objects.filter(parameter_set=result.parameter_set)
    assert (mod.property.key, mod.user, mod.old_value, mod.new_value) == (
        "mask",
        bob,
        [{"pixel": "1-8,121-128"}],
        [{"bank": "36-50"}],
    )
    assert result.parameter_set.number == 2
    assert "MASK = [{'bank': '36-50'}]" in result.path.read_text()


def test_resubmitting_identical_values_creates_no_version_and_no_audit_row() -> None:
    user = UserFactory()
    values = reduction_config_current("chai")
    first = reduction_config_update("chai", values=values, user=user)
    audit = PropertyModification.objects.count()
    first.path.unlink()  # someone deleted the script: an identical save puts it back

    again = reduction_config_update("chai", values=values, user=user)

    assert (again.created, again.changed_keys, again.parameter_set) == (
        False,
        [],
        first.parameter_set,
    )
    assert PropertyModification.objects.count() == audit
    assert again.path.read_text() == first.parameter_set.script_text


def test_reset_saves_the_defaults_as_an_audited_version() -> None:
    user = UserFactory()
    defaults = reduction_config_current("primecam")
    reduction_config_update("primecam", values=defaults | {"highpass_hz": 0.5}, user=user)

    result = reduction_config_reset("primecam", user=user)

    assert result.parameter_set.action == ParameterSet.Action.RESET
    assert result.parameter_set.comment == "Reset to defaults"
    assert result.changed_keys == ["highpass_hz"]
    mod = PropertyModification.objects.get(parameter_set=result.parameter_set)
    assert (mod.old_value, mod.new_value, mod.user) == (0.5, 0.1, user)
    assert reduction_config_current("primecam") == defaults


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"e_step": None}, "e_step: missing"),
        ({"colour": "blue"}, "colour: unknown parameter"),
        ({"e_min": "abc"}, "e_min: Enter a number: 'abc' is not a number"),
        ({"e_min": [1]}, "e_min: expected a number, got a list"),
        ({"mask": "Bank=99"}, "mask: line 1, Bank: 99 is above the largest allowed value 50"),
    ],
)
def test_invalid_values_raise_naming_the_key_and_change_nothing(
    change: dict[str, object], message: str
) -> None:
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = snapshot()
    values = reduction_config_current("cncs") | change
    values = {k: v for k, v in values.items() if v is not None}

    with pytest.raises(InvalidParameters) as info:
        reduction_config_update("cncs", values=values, user=UserFactory())

    assert message in str(info.value)
    assert snapshot() == before


def test_unknown_instrument_changes_nothing() -> None:
    with pytest.raises(UnknownInstrument):
        reduction_config_update("lrs", values={}, user=None)
    assert not ParameterSet.objects.exists()


@pytest.fixture
def broken_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Point the CNCS instrument at a template the test writes."""
    instrument = get_instrument("cncs")
    folder = tmp_path / "template"
    folder.mkdir()
    template = folder / instrument.template_name
    template.write_text(instrument.template_source())
    patched = dataclasses.replace(instrument, package_dir=folder)
    monkeypatch.setattr("reduction.services.get_instrument", lambda key: patched)
    return template


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("X = {{ e_min \n", "template syntax error"),
        ("X = {{ no_such_key }}\n", "'no_such_key' is undefined"),
        ("X = {{ vanadium_file.__class__.__mro__ }}\n", "unsafe"),
        ("X = {{ e_min }} {{ e_max }}\n", "rendered script is not valid Python"),
    ],
)
def test_template_failures_change_nothing(broken_template: Path, source: str, message: str) -> None:
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = snapshot()
    broken_template.write_text(source)

    with pytest.raises(ScriptRenderError, match=message):
        reduction_config_update(
            "cncs", values=reduction_config_current("cncs") | {"e_min": 0.0}, user=None
        )

    assert snapshot() == before


def test_a_file_where_the_script_directory_should_be_changes_nothing(
    settings, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the script directory should be")
    settings.REDUCTION_SCRIPT_DIR = blocker
    before = snapshot()

    with pytest.raises(
        ScriptWriteError, match=r"cannot (read|write) .*not-a-directory/cncs/reduce_CNCS.py"
    ):
        reduction_config_update(
            "cncs", values=reduction_config_current("cncs") | {"e_min": 0.0}, user=None
        )

    assert snapshot() == before
    assert blocker.read_text() == "a file where the script directory should be"


NOBODY = 65534


@contextmanager
def without_root_privileges() -> Iterator[None]:
    """Run the body with the file-system rights of an ordinary user.

    Root (as in CI) ignores directory permissions, so a read-only directory would not stop it;
    switching the effective uid to ``nobody`` makes the kernel check them, as it does for the web
    server's user in production. The real and saved uids stay 0, so root is restored after.
    """
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def read_only_script_dir(settings) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """An instrument script directory holding the current CNCS script, made read-only.

    Made under the system temporary directory (world-traversable), not pytest's tmp_path (whose
    base is private to root), so that ``nobody`` can reach it.
    """
    with tempfile.TemporaryDirectory(prefix="reduction-ro-") as base:
        root = Path(base)
        root.chmod(0o755)
        settings.REDUCTION_SCRIPT_DIR = root
        yield root / "cncs"
        if (root / "cncs").exists():
            (root / "cncs").chmod(0o755)  # so that TemporaryDirectory can remove it


def test_a_read_only_script_directory_changes_nothing(
    read_only_script_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    assert first.path.parent == read_only_script_dir
    read_only_script_dir.chmod(0o555)
    before = snapshot()

    # Only the file step runs without root: the database and the template are read as usual.
    install = services._install

    def install_without_root(path: Path, script: str) -> object:
        with without_root_privileges():
            return install(path, script)

    monkeypatch.setattr(services, "_install", install_without_root)
    with pytest.raises(
        ScriptWriteError, match=r"cannot write .*/cncs/reduce_CNCS.py: Permission denied"
    ):
        reduction_config_update(
            "cncs", values=reduction_config_current("cncs") | {"e_min": 0.0}, user=UserFactory()
        )

    assert os.geteuid() == os.getuid()
    assert snapshot() == before
    assert first.path.read_text() == first.parameter_set.script_text
    assert sorted(p.name for p in read_only_script_dir.iterdir()) == ["reduce_CNCS.py"]


def test_a_rename_that_fails_after_the_temporary_file_was_written_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = snapshot()
    attempts: list[str] = []

    def failing_replace(src: str, dst: object) -> None:
        attempts.append(src)
        assert Path(src).read_text().startswith("#!/usr/bin/env python3")  # fully written
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(services.os, "replace", failing_replace)
    with pytest.raises(ScriptWriteError, match=r"reduce_CNCS\.py: Read-only file system"):
        reduction_config_update(
            "cncs", values=reduction_config_current("cncs") | {"e_min": 0.0}, user=None
        )

    assert len(attempts) == 1 and not Path(attempts[0]).exists()  # temporary file removed
    assert snapshot() == before
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["reduce_CNCS.py"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_commit_puts_the_previous_script_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = snapshot()

    def failing_commit(*args: object, **kwargs: object) -> None:
        raise DatabaseError("database went away at commit")

    monkeypatch.setattr(connection, "commit", failing_commit)
    with pytest.raises(DatabaseError, match="went away"):
        reduction_config_update(
            "cncs", values=reduction_config_current("cncs") | {"e_min": 0.0}, user=None
        )
    monkeypatch.undo()

    assert first.path.read_text() == first.parameter_set.script_text
    assert snapshot() == before


def test_parameter_sets_cannot_be_changed_once_saved() -> None:
    result = reduction_config_update("chai", values=reduction_config_current("chai"), user=None)
    ps = result.parameter_set
    ps.comment = "rewritten history"
    with pytest.raises(ImmutableRowError):
        ps.save()


def test_preview_renders_without_writing_anything() -> None:
    script = reduction_config_render(
        "chai", reduction_config_current("chai") | {"baseline_order": 3}
    )
    assert "BASELINE_ORDER = 3\n" in script and "'version': None" in script
    assert not ParameterSet.objects.exists()
    assert not get_instrument("chai").script_path().exists()


def test_diff_lists_changed_values_and_script_lines() -> None:
    values = reduction_config_current("cncs")
    a = reduction_config_update("cncs", values=values, user=None).parameter_set
    b = reduction_config_update("cncs", values=values | {"e_max": 0.8}, user=None).parameter_set

    diff = reduction_config_diff(a, b)

    assert [(c.key, c.old, c.new) for c in diff.changed_values] == [("e_max", 0.95, 0.8)]
    assert "-E_MAX = 0.95" in diff.script_lines and "+E_MAX = 0.8" in diff.script_lines
    assert diff.script_lines[:2] == ["--- v1", "+++ v2"]


def test_a_save_from_a_stale_form_audits_against_what_was_saved_in_between() -> None:
    """Alice opens the form, Bob saves, Alice saves: the audit shows Bob's value as Alice's old
    value (not the one her form showed) and the versions are consecutive."""
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    alice_form = reduction_config_current("cncs")

    reduction_config_update("cncs", values=alice_form | {"e_min": -0.3}, user=bob)
    result = reduction_config_update("cncs", values=alice_form | {"e_min": -0.4}, user=alice)

    assert result.parameter_set.number == 3
    mod = PropertyModification.objects.get(parameter_set=result.parameter_set)
    assert (mod.user, mod.old_value, mod.new_value) == (alice, -0.3, -0.4)


@pytest.mark.django_db(transaction=True)
def test_concurrent_saves_produce_consecutive_versions_and_consistent_histories(
    require_postgres: None,
) -> None:
    # Real concurrency needs a server database: SQLite's in-memory test database answers
    # "table is locked" at once instead of waiting (a file database waits; see settings).
    users = [UserFactory(username=f"sci{i}") for i in range(2)]
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def save(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            for n in range(3):
                values = reduction_config_current("cncs") | {"e_min": -0.1 - i * 0.01 - n * 0.1}
                reduction_config_update("cncs", values=values, user=users[i])
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not errors, errors
    versions = list(ParameterSet.objects.filter(instrument="cncs").order_by("number"))
    assert [v.number for v in versions] == list(range(1, 8))
    # Each version's audit row starts from the value the previous version saved.
    for previous, current in itertools.pairwise(versions):
        (mod,) = PropertyModification.objects.filter(parameter_set=current)
        assert mod.old_value == previous.values["e_min"]
        assert mod.new_value == current.values["e_min"]
    latest = versions[-1]
    assert get_instrument("cncs").script_path().read_text() == latest.script_text
    assert (
        ReductionProperty.objects.get(instrument="cncs", key="e_min").value
        == latest.values["e_min"]
    )
    assert {v.author for v in versions[1:]} == set(users)


def test_errors_inside_an_outer_transaction_leave_it_usable() -> None:
    with transaction.atomic():
        with pytest.raises(InvalidParameters):
            reduction_config_update("cncs", values={"e_min": 1}, user=None)
        assert ParameterSet.objects.count() == 0


@pytest.mark.parametrize(
    ("comment", "message"),
    [
        ("x" * 501, "comment: at most 500 characters, got 501"),
        ("beam\x00stop", "comment: contains a NUL character or invalid Unicode"),
        ("beam \udcff stop", "comment: contains a NUL character or invalid Unicode"),
    ],
)
def test_a_comment_no_database_would_keep_is_refused_and_changes_nothing(
    comment: str, message: str
) -> None:
    # PostgreSQL refuses NUL in text and lone surrogates in any string; SQLite would keep them.
    # Either way the save is refused up front, the same on both.
    reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    before = snapshot()
    with pytest.raises(InvalidParameters, match=message):
        reduction_config_update(
            "cncs",
            values=reduction_config_current("cncs") | {"e_min": 0.0},
            user=None,
            comment=comment,
        )
    assert snapshot() == before


def test_a_comment_is_kept_without_surrounding_blanks() -> None:
    result = reduction_config_update(
        "cncs", values=reduction_config_current("cncs"), user=None, comment="  beam stop \n"
    )
    assert result.parameter_set.comment == "beam stop"


def test_the_first_save_records_only_the_keys_that_differ_from_the_defaults() -> None:
    user = UserFactory()
    defaults = reduction_config_current("cncs")

    result = reduction_config_update("cncs", values=defaults | {"e_min": -0.1}, user=user)

    assert result.changed_keys == ["e_min"]
    (mod,) = PropertyModification.objects.filter(parameter_set=result.parameter_set)
    assert (mod.property.key, mod.old_value, mod.new_value) == ("e_min", -0.2, -0.1)
    # Every key is stored, so a later change of a default does not change the saved values.
    assert ReductionProperty.objects.filter(instrument="cncs").count() == len(defaults)

    first = reduction_config_update("chai", values=reduction_config_current("chai"), user=user)
    assert (first.created, first.changed_keys) == (True, [])
    assert not PropertyModification.objects.filter(parameter_set=first.parameter_set).exists()


def test_a_key_added_since_the_last_save_counts_as_holding_its_default() -> None:
    values = reduction_config_current("cncs")
    for key, value in values.items():
        if key != "e_step":
            ReductionProperty.objects.create(instrument="cncs", key=key, value=value)

    result = reduction_config_update("cncs", values=values | {"e_max": 0.9}, user=None)

    assert result.changed_keys == ["e_max"]
    assert ReductionProperty.objects.get(instrument="cncs", key="e_step").value == 0.005
