"""Writes of the reduction configuration: save, reset, and a version's script file.

Every change goes through ``reduction_config_update``: one validation (the instrument's form),
one transaction (properties, audit rows, the new ParameterSet, and what the receivers of
``reduction.signals.parameter_set_created`` write: the workflow's stale products), one rendering
(the sandboxed environment of ``reduction.rendering``) and one atomic file replacement, made
while the instrument's lock row is held (or, inside a caller's transaction, when that commits).
Any failure up to the commit leaves the database and the script file as they were.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, transaction

from reduction.errors import InvalidParameters, ReductionConfigError, ScriptWriteError
from reduction.forms import (
    errors_as_dict,
    forbidden_character,
    forbidden_character_message,
    has_unstorable_text,
)
from reduction.instruments import get_instrument
from reduction.instruments.base import Instrument
from reduction.models import (
    ParameterSet,
    ParameterSetAction,
    PropertyModification,
    ReductionConfigLock,
    ReductionProperty,
)
from reduction.rendering import ScriptRenderError, checksum, render_source, script_context
from reduction.signals import parameter_set_created

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigWriteResult:
    """What a save did. ``created`` is False when the values and the rendered script equal the
    latest version: no new version, no audit rows, the script on disk re-checked."""

    parameter_set: ParameterSet
    path: Path
    checksum: str
    changed_keys: list[str]
    created: bool = True
    # True when the save ran inside a caller's transaction: the script is installed at ``path``
    # when that transaction commits (and never if it rolls back), not before this returned.
    pending: bool = False


# --- Reading -------------------------------------------------------------------------------------


def reduction_config_current(instrument_key: str) -> dict[str, Any]:
    """The instrument's current values: stored rows, else the form's defaults, in form order.
    Rows for keys the form no longer has are ignored."""
    instrument = get_instrument(instrument_key)
    values = instrument.defaults()
    stored = dict(
        ReductionProperty.objects.filter(instrument=instrument_key).values_list("key", "value")
    )
    return {key: stored.get(key, default) for key, default in values.items()}


def _stored_form(value: Any) -> Any:
    """``value`` as the database gives it back, for comparison: every number as an exact
    Decimal (jsonb keeps numbers as decimals, so the float 1e30 returns as the int 10**30; SQLite
    keeps the float), booleans, text and None tagged so that none equals a number, lists and
    objects recursively."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int):
        return ("number", Decimal(value))
    if isinstance(value, float):
        # repr is the shortest text that reads back as this float: what json.dumps writes and
        # what jsonb parses.
        return ("number", Decimal(repr(value)))
    if isinstance(value, str):
        return ("text", value)
    if isinstance(value, list | tuple):
        return ("list", [_stored_form(v) for v in value])
    if isinstance(value, Mapping):
        return ("object", {k: _stored_form(v) for k, v in value.items()})
    return ("other", value)


def stored_values_equal(a: Any, b: Any) -> bool:
    """Whether two JSON values are the same once stored: ``1e30 == 10**30`` and ``0.0 == 0``,
    but ``True != 1`` and ``"1" != 1``. Every "did this change" test of the app uses this, so
    that the same save is a no-change on PostgreSQL and on SQLite alike."""
    return bool(_stored_form(a) == _stored_form(b))


# The longest comment kept with a version (the page's input has the same maxlength).
COMMENT_MAX_LENGTH = 500


def validate_comment(instrument_key: str, comment: str) -> str:
    """The comment without surrounding blanks, or InvalidParameters under the key ``comment``."""
    comment = comment.strip()
    problems = []
    if len(comment) > COMMENT_MAX_LENGTH:
        problems.append(f"at most {COMMENT_MAX_LENGTH} characters, got {len(comment)}")
    bad = forbidden_character(comment)
    if has_unstorable_text(comment):
        problems.append("contains a NUL character or invalid Unicode")
    elif bad is not None:
        # Inside the comment: the blanks stripped above (a newline from the shell) are harmless.
        problems.append(forbidden_character_message(bad))
    if problems:
        raise InvalidParameters(instrument_key, {"comment": problems})
    return comment


def validate_values(instrument: Instrument, values: Mapping[str, Any]) -> dict[str, Any]:
    """The complete, validated value set, or InvalidParameters naming every bad key."""
    form = instrument.form_class.from_values(values)
    if not form.is_valid():
        raise InvalidParameters(instrument.key, errors_as_dict(form))
    return form.cleaned_values()


def _render(instrument: Instrument, values: Mapping[str, Any], version: int | None) -> str:
    try:
        source = instrument.template_source()
    except OSError as exc:
        raise ScriptRenderError(
            instrument.template_name, f"cannot read the template: {exc}"
        ) from exc
    context = script_context(
        values, instrument_key=instrument.key, label=instrument.label, version=version
    )
    return render_source(source, context, template_name=instrument.template_name)


def reduction_config_render(
    instrument_key: str, values: Mapping[str, Any], *, version: int | None = None
) -> str:
    """The script ``values`` would produce (a preview: validates and renders, writes nothing)."""
    instrument = get_instrument(instrument_key)
    return _render(instrument, validate_values(instrument, values), version)


# --- Files ---------------------------------------------------------------------------------------


@dataclass
class _Installed:
    """A script file we replaced, and what was there before, so a failed commit can undo it."""

    path: Path
    previous: bytes | None
    written_checksum: str

    def undo(self) -> None:
        # Only if the file is still ours: never clobber what a later save wrote.
        try:
            current = self.path.read_bytes()
        except FileNotFoundError:
            current = None
        if current is None or checksum(current.decode("utf-8", "replace")) != self.written_checksum:
            return
        if self.previous is None:
            with suppress(FileNotFoundError):
                self.path.unlink()
        else:
            _atomic_write(self.path, self.previous)


def _write_temporary(path: Path, content: bytes) -> str:
    """Write ``content`` to a new temporary file next to ``path`` (fsync'd, mode 0644) and return
    its name; on failure remove it and raise ScriptWriteError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ScriptWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
    except OSError as exc:
        with suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise ScriptWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return tmp_name


def _atomic_write(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` so that readers see the old file or the new one, never a
    partial one: a temporary file in the same directory, fsync, rename over."""
    tmp_name = _write_temporary(path, content)
    try:
        os.replace(tmp_name, path)
    except OSError as exc:
        with suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise ScriptWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _read_previous(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ScriptWriteError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _install(path: Path, script: str) -> _Installed | None:
    """Replace ``path`` with ``script`` unless it already holds exactly that."""
    previous = _read_previous(path)
    content = script.encode("utf-8")
    if previous == content:
        return None
    _atomic_write(path, content)
    return _Installed(path, previous, checksum(script))


def _check_installable(path: Path, script: str) -> None:
    """Everything installing ``script`` does except the final rename: read the current file and
    write the new one in full to a temporary file beside it, which is then removed. Raises
    ScriptWriteError for what would stop the install (no directory, no permission, a full disk).

    The temporary file is not kept for a rename at commit: if the caller's transaction rolled
    back, nothing would remove it (Django has no rollback hook)."""
    if _read_previous(path) == script.encode("utf-8"):
        return
    tmp_name = _write_temporary(path, script.encode("utf-8"))
    with suppress(FileNotFoundError):
        os.unlink(tmp_name)


def _lock(instrument_key: str) -> None:
    """Hold the instrument's lock row until the current transaction ends."""
    list(ReductionConfigLock.objects.select_for_update().filter(instrument=instrument_key))


def _undo_under_lock(instrument_key: str, installed: _Installed) -> None:
    """Put the previous script back after the commit of the save that replaced it failed.

    That failure ended the transaction and so released the instrument's lock; a concurrent save
    may have taken it since. The undo takes the lock again, so such a save has either committed
    and installed its script already (the file is no longer ours and undo leaves it alone) or
    waits until the undo is done and then installs its own. Only when the lock cannot be had at
    all (the database is gone) does the undo run without it, still only if the file is ours.
    """
    undone = False
    try:
        with transaction.atomic():
            _lock(instrument_key)
            installed.undo()
            undone = True
    except DatabaseError:
        # A failure to commit this read-only transaction after the undo is harmless.
        if not undone:
            logger.warning(
                "%s: cannot lock the instrument to put back %s after a failed commit; "
                "putting it back without the lock",
                instrument_key,
                installed.path,
            )
            installed.undo()


def _install_latest_on_commit(instrument_key: str) -> None:
    """After a caller's transaction holding a save committed: make the script file the latest
    version's, under the instrument's lock.

    Taking the lock and installing the *latest* version (not the one this hook was registered
    for) keeps the file right whatever order the hooks of several saves run in: every commit is
    followed by its hook, and the last hook to run, serialised with every save by the lock,
    installs the last committed version. A failure is logged, not raised, because the caller's
    transaction has already committed; the next save of the instrument installs the script.
    """
    try:
        with transaction.atomic():
            _lock(instrument_key)
            latest = ParameterSet.objects.latest_for(instrument_key)
            if latest is not None:
                _install(get_instrument(instrument_key).script_path(), latest.script_text)
    except Exception:
        logger.exception(
            "%s: the saved reduction parameters were committed but the script was not installed",
            instrument_key,
        )


def _in_callers_transaction() -> bool:
    """Whether a transaction of the caller is open, so that leaving our atomic block only
    releases a savepoint. A test case's wrapping transaction does not count, the same rule
    ``transaction.atomic(durable=True)`` applies."""
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        return False
    return not getattr(connection.atomic_blocks[-1], "_from_testcase", False)


def _place_script(
    instrument_key: str, path: Path, script: str, *, deferred: bool
) -> _Installed | None:
    """Install now (returning what to undo if the commit fails) or, when ``deferred``, check that
    it could be installed and install it when the outermost transaction commits."""
    if not deferred:
        return _install(path, script)
    _check_installable(path, script)
    transaction.on_commit(lambda: _install_latest_on_commit(instrument_key))
    return None


# --- Saving --------------------------------------------------------------------------------------


def reduction_config_update(
    instrument_key: str,
    *,
    values: Mapping[str, Any],
    user: User | None,
    comment: str = "",
    action: str = ParameterSetAction.EDIT,
) -> ConfigWriteResult:
    """Save a complete value set of one instrument and install its script.

    In one transaction, holding the instrument's lock row: store the properties whose value
    changed (one PropertyModification each, with old and new value, user and the new version;
    a key never stored counts as holding its default, which is its old value, so the first save
    records only what differs from the defaults; ``changed_keys`` lists the same keys), store
    the never-stored keys that kept their default without an audit row,
    create the next ParameterSet with the rendered script and its sha256, send
    ``reduction.signals.parameter_set_created`` (its receivers write in this transaction: the
    workflow marks products made with older versions stale), and atomically replace
    ``reduce_<KEY>.py`` in the instrument's output directory. Values are compared as stored
    (``stored_values_equal``): a save equal to the latest version creates nothing (and sends
    nothing) and only re-installs its script if the file differs. Raises UnknownInstrument,
    InvalidParameters (bad values, or a comment that is too long or holds text no database
    stores), ScriptRenderError, ScriptWriteError, or what a receiver of the signal raised, with
    nothing changed.

    When the script file is replaced depends on who owns the transaction:

    * Called outside any transaction (the pages, the command): the file is replaced inside ours,
      as its last step, so that the returned path and checksum mean "installed" and a file that
      cannot be written means "nothing saved"; the page reports one or the other, truthfully. If
      the commit then fails, the previous file is put back under the instrument's lock.
    * Called inside a caller's transaction (the workflow engine): our commit is only a savepoint
      release and the caller may still roll back, so replacing the file now could leave a script
      on disk whose version never existed. Instead the new script is written in full to a
      temporary file beside the target (and removed), so a file that cannot be written still
      raises here with nothing saved, and the file is installed when the caller commits (by a
      ``transaction.on_commit`` hook, under the lock; never if it rolls back). The result then
      has ``pending=True``. A failure of that late install is logged, not raised.

    Requiring a durable transaction instead was rejected: the workflow engine saves first
    versions from inside its own transactions.
    """
    instrument = get_instrument(instrument_key)
    cleaned = validate_values(instrument, values)
    comment = validate_comment(instrument_key, comment)
    path = instrument.script_path()
    deferred = _in_callers_transaction()
    # The lock row must exist before the transaction that locks it; get_or_create copes with two
    # processes creating it at once.
    ReductionConfigLock.objects.get_or_create(instrument=instrument_key)
    installed: _Installed | None = None
    try:
        with transaction.atomic():
            ReductionConfigLock.objects.select_for_update().get(instrument=instrument_key)
            latest = ParameterSet.objects.latest_for(instrument_key)
            rows = {p.key: p for p in ReductionProperty.objects.filter(instrument=instrument_key)}
            # What the form showed: the stored value, else the default (never saved, or a key
            # added since the last save). Only keys that differ from it count as changed.
            defaults = instrument.defaults()
            shown = {k: rows[k].value if k in rows else defaults.get(k) for k in cleaned}
            changed = [k for k, v in cleaned.items() if not stored_values_equal(shown[k], v)]

            if not changed and latest is not None and stored_values_equal(latest.values, cleaned):
                script = _render(instrument, cleaned, latest.number)
                if checksum(script) == latest.script_checksum:
                    installed = _place_script(instrument_key, path, script, deferred=deferred)
                    return ConfigWriteResult(
                        latest, path, latest.script_checksum, [], False, pending=deferred
                    )

            number = latest.number + 1 if latest else 1
            script = _render(instrument, cleaned, number)
            digest = checksum(script)
            parameter_set = ParameterSet.objects.create(
                instrument=instrument_key,
                number=number,
                values=cleaned,
                script_path=str(path),
                script_checksum=digest,
                script_text=script,
                author=user,
                comment=comment,
                action=action,
            )
            # Every key gets a row, so that the stored values stay complete if a default changes
            # in a later release; those that kept their default get no audit row.
            for key in cleaned:
                if key not in rows and key not in changed:
                    ReductionProperty.objects.create(
                        instrument=instrument_key, key=key, value=cleaned[key]
                    )
            for key in changed:
                row = rows.get(key)
                old = shown[key]
                if row is None:
                    row = ReductionProperty.objects.create(
                        instrument=instrument_key, key=key, value=cleaned[key]
                    )
                else:
                    row.value = cleaned[key]
                    row.save(update_fields=["value", "updated_at"])
                PropertyModification.objects.create(
                    property=row,
                    parameter_set=parameter_set,
                    user=user,
                    old_value=old,
                    new_value=cleaned[key],
                )
            # Dependants react in this transaction; a receiver's exception aborts the save.
            parameter_set_created.send(
                sender=ParameterSet,
                instrument_key=instrument_key,
                parameter_set=parameter_set,
                previous=latest,
            )
            # Last, so that every database error above happens before the file changes.
            installed = _place_script(instrument_key, path, script, deferred=deferred)
    except BaseException:
        # Only a failed commit gets here with a file installed (it is the last step above).
        if installed is not None:
            _undo_under_lock(instrument_key, installed)
        raise
    return ConfigWriteResult(parameter_set, path, digest, changed, True, pending=deferred)


def reduction_config_reset(
    instrument_key: str, *, user: User | None, comment: str = ""
) -> ConfigWriteResult:
    """Save the instrument's defaults as a new version, audited like any edit."""
    instrument = get_instrument(instrument_key)
    return reduction_config_update(
        instrument_key,
        values=instrument.defaults(),
        user=user,
        comment=comment or "Reset to defaults",
        action=ParameterSetAction.RESET,
    )


# --- Comparing versions --------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueChange:
    key: str
    old: Any
    new: Any

    @property
    def changed(self) -> bool:
        return not stored_values_equal(self.old, self.new)


@dataclass(frozen=True)
class ConfigDiff:
    old: ParameterSet
    new: ParameterSet
    values: list[ValueChange]
    script_lines: list[str]

    @property
    def changed_values(self) -> list[ValueChange]:
        return [v for v in self.values if v.changed]


def script_diff_lines(old_text: str, new_text: str, *, old_name: str, new_name: str) -> list[str]:
    """A unified diff of two scripts, one string per line, no line endings."""
    return list(
        difflib.unified_diff(
            old_text.splitlines(),
            new_text.splitlines(),
            fromfile=old_name,
            tofile=new_name,
            lineterm="",
        )
    )


@dataclass(frozen=True)
class ConfigPreview:
    """What a save of ``values`` would install, compared with the latest version.

    ``version`` is the number the script carries: the latest one when the values equal it (a
    save would make no new version unless the template changed), else the next one (the one a
    save now would create, unless someone else saves first). ``against`` is the latest version,
    None if never saved.
    """

    script: str
    checksum: str
    version: int
    against: ParameterSet | None
    diff_lines: list[str]


def reduction_config_preview(instrument_key: str, values: Mapping[str, Any]) -> ConfigPreview:
    """Validate and render ``values`` as the version a save would make; writes nothing."""
    instrument = get_instrument(instrument_key)
    cleaned = validate_values(instrument, values)
    latest = ParameterSet.objects.latest_for(instrument_key)
    if latest is None:
        number = 1
    elif stored_values_equal(latest.values, cleaned):
        number = latest.number
    else:
        number = latest.number + 1
    script = _render(instrument, cleaned, number)
    lines = (
        script_diff_lines(
            latest.script_text, script, old_name=f"v{latest.number}", new_name="preview"
        )
        if latest is not None
        else []
    )
    return ConfigPreview(script, checksum(script), number, latest, lines)


def reduction_config_diff(old: ParameterSet, new: ParameterSet) -> ConfigDiff:
    """Values side by side (every key of either version; a key one version lacks shows None)
    and a unified diff of the two scripts."""
    if old.instrument != new.instrument:
        raise ReductionConfigError(
            f"cannot compare {old} with {new}: they belong to different instruments"
        )
    keys = list(old.values) + [k for k in new.values if k not in old.values]
    values = [ValueChange(key, old.values.get(key), new.values.get(key)) for key in keys]
    script_lines = script_diff_lines(
        old.script_text, new.script_text, old_name=f"v{old.number}", new_name=f"v{new.number}"
    )
    return ConfigDiff(old, new, values, script_lines)


# --- A version's script, for a run ---------------------------------------------------------------


def parameter_set_script_write(parameter_set: ParameterSet, directory: Path) -> Path:
    """Write the version's script byte for byte as stored, atomically, as ``reduce_<KEY>.py`` in
    ``directory`` (created if missing) and return its path. Checks the stored checksum first:
    raises ReductionConfigError, writing nothing, when the script does not match it, and
    ScriptWriteError when the file cannot be written. The workflow calls this for each run."""
    instrument = get_instrument(parameter_set.instrument)
    if checksum(parameter_set.script_text) != parameter_set.script_checksum:
        raise ReductionConfigError(
            f"{parameter_set}: stored script does not match its checksum; not using it"
        )
    path = Path(directory) / instrument.script_name
    _atomic_write(path, parameter_set.script_text.encode("utf-8"))
    return path
