"""Ingest: what the telescope tells us about scans and the raw files they wrote.

The JSON ingest API (SPEC §7, ops-db brief §7) and the demo simulator call these functions.
Clients may be offline and retry, so every write is idempotent on a client-supplied UUID: a
repeat with identical data returns the existing row (``created`` False), a repeat that
contradicts what is registered raises ``IngestError``. Every rejected request writes nothing.

Checksums are verified at ingest (SPEC §8) whenever the file's SOURCE location is a disk this
process can read; otherwise the copy is recorded unverified and the integrity manager verifies
it later.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.db import IntegrityError, models, transaction
from django.utils import timezone

from pipelines.exceptions import IngestError, UnsafePath
from pipelines.models import (
    DataLocation,
    ExecutedObsUnit,
    InstrumentModule,
    InstrumentModuleConfiguration,
    ObsUnit,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
)
from pipelines.storage import checksums
from pipelines.storage.paths import normalize_relative_path, safe_join

from .states import TransitionConflict, record_creation, transition

ObsStatus = ExecutedObsUnit.ObsStatus

FINISH_STATUSES = (ObsStatus.COMPLETED, ObsStatus.FAILED, ObsStatus.ABORTED)

# Files may be registered while a scan runs and after it ends (the API buffers and replays
# writes, so a registration can arrive after the finish). An aborted scan was stopped on
# purpose (weather, schedule) and the data written until then is valid, so it is kept. A
# failed scan is one the instrument control system declared unusable: its files are refused
# so that known-bad data never enters the archive.
REGISTRABLE_SCAN_STATUSES = (ObsStatus.RUNNING, ObsStatus.COMPLETED, ObsStatus.ABORTED)

# RawDataFile columns compared when the same id is registered again.
_IDENTITY_FIELDS = (
    "executed_obs_unit_id",
    "instrument_module_id",
    "source_location_id",
    "relative_path",
    "name",
    "size",
    "checksum",
    "checksum_algorithm",
    "file_type",
    "metadata",
)

# Column limits, checked before any write so that a value too long is an IngestError on every
# database (PostgreSQL raises DataError, SQLite stores it silently). The path is also the source
# copy's path.
_RELATIVE_PATH_MAX = min(
    RawDataFile._meta.get_field("relative_path").max_length or 1000,
    PhysicalCopy._meta.get_field("relative_path").max_length or 1000,
)
_NAME_MAX = RawDataFile._meta.get_field("name").max_length or 255
_FILE_TYPE_MAX = RawDataFile._meta.get_field("file_type").max_length or 50
_SIZE_MAX = models.BigIntegerField.MAX_BIGINT

# JSON (metadata, conditions) is stored as jsonb on PostgreSQL and as text on SQLite. Nesting
# and integer size are bounded so that encoding it can neither recurse too deep nor hit
# Python's int-to-text digit limit.
_JSON_MAX_DEPTH = 64
_JSON_INT_DIGITS = 1000
_JSON_INT_LIMIT = 10**_JSON_INT_DIGITS


# --- Executed obs units ---------------------------------------------------------------------------
def executed_obs_unit_start(
    *,
    obs_unit: ObsUnit,
    start_time: datetime,
    id: uuid.UUID | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    conditions: Mapping[str, Any] | None = None,
    instrument_module_configurations: Iterable[InstrumentModuleConfiguration] = (),
    actor: str,
) -> tuple[ExecutedObsUnit, bool]:
    """Record that a scan of ``obs_unit`` started; returns ``(scan, created)``.

    ``id`` is the client's UUID (generated here when absent). Repeating a start with the same
    id, obs unit and start time returns the existing scan with ``created`` False, whatever its
    status is now; the same id with a different obs unit or start time raises ``IngestError``.
    A new scan is ``running`` and gets its creation event.
    """
    scan_id = _parse_uuid(id, "executed obs unit id") if id is not None else uuid.uuid4()
    _require_aware(start_time, "start_time")
    scan_metadata = _json_object(metadata, "metadata")
    scan_conditions = _json_object(conditions, "conditions")
    configurations = list(instrument_module_configurations)

    existing = ExecutedObsUnit.objects.filter(pk=scan_id).first()
    if existing is not None:
        return _same_start(existing, obs_unit=obs_unit, start_time=start_time), False

    try:
        with transaction.atomic():
            scan = ExecutedObsUnit.objects.create(
                id=scan_id,
                obs_unit=obs_unit,
                start_time=start_time,
                status=ObsStatus.RUNNING,
                metadata=scan_metadata,
                conditions=scan_conditions,
            )
            if configurations:
                scan.instrument_module_configurations.set(configurations)
            record_creation(scan, actor=actor, reason="scan started")
    except IntegrityError:
        # A concurrent start with the same id won the insert; answer as for a repeat.
        existing = ExecutedObsUnit.objects.filter(pk=scan_id).first()
        if existing is None:
            raise
        return _same_start(existing, obs_unit=obs_unit, start_time=start_time), False
    return scan, True


def _same_start(
    scan: ExecutedObsUnit, *, obs_unit: ObsUnit, start_time: datetime
) -> ExecutedObsUnit:
    if scan.obs_unit_id != obs_unit.pk:
        raise IngestError(
            f"executed obs unit {scan.pk} is already registered for obs unit "
            f"{scan.obs_unit.name!r}, not {obs_unit.name!r}"
        )
    if scan.start_time != start_time:
        raise IngestError(
            f"executed obs unit {scan.pk} is already registered with start time "
            f"{scan.start_time.isoformat()}, not {start_time.isoformat()}"
        )
    return scan


def executed_obs_unit_finish(
    executed_obs_unit: ExecutedObsUnit,
    *,
    end_time: datetime,
    status: str = ObsStatus.COMPLETED,
    conditions: Mapping[str, Any] | None = None,
    actor: str,
) -> ExecutedObsUnit:
    """Close a running scan: ``running`` → ``completed`` | ``failed`` | ``aborted``.

    ``conditions`` are merged into the scan's conditions. Repeating the same finish (same
    status and end time) is a no-op returning the row. Raises ``IngestError`` for an unknown
    status, an end before the start, or a scan already finished differently.
    """
    scan = executed_obs_unit
    status = str(status)
    if status not in FINISH_STATUSES:
        allowed = ", ".join(FINISH_STATUSES)
        raise IngestError(f"finish status {status!r} is not one of: {allowed}")
    _require_aware(end_time, "end_time")
    new_conditions = _json_object(conditions, "conditions")
    scan.refresh_from_db()
    if end_time < scan.start_time:
        raise IngestError(
            f"end_time {end_time.isoformat()} is before the scan's start_time "
            f"{scan.start_time.isoformat()}"
        )
    if scan.status != ObsStatus.RUNNING:
        return _same_finish(scan, status=status, end_time=end_time)
    merged = {**scan.conditions, **new_conditions}
    try:
        return transition(
            scan,
            status,
            actor=actor,
            expected=ObsStatus.RUNNING,
            reason="scan finished",
            updates={"end_time": end_time, "conditions": merged},
        )
    except TransitionConflict:
        # A concurrent finish got there first: fine if it said the same thing.
        scan.refresh_from_db()
        return _same_finish(scan, status=status, end_time=end_time)


def _same_finish(scan: ExecutedObsUnit, *, status: str, end_time: datetime) -> ExecutedObsUnit:
    if scan.status == status and scan.end_time == end_time:
        return scan
    ended = scan.end_time.isoformat() if scan.end_time else "unknown"
    raise IngestError(
        f"executed obs unit {scan.pk} already finished as {scan.status!r} at {ended}; "
        f"cannot finish it again as {status!r} at {end_time.isoformat()}"
    )


# --- Raw data files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PreparedFile:
    """A validated registration, ready to write. ``existing`` is set for an identical repeat."""

    values: dict[str, Any]
    verified_checksum: str
    existing: RawDataFile | None = None


def raw_data_file_register(
    *,
    executed_obs_unit: ExecutedObsUnit,
    instrument_module: InstrumentModule,
    source_location: DataLocation,
    relative_path: str,
    size: int,
    checksum: str,
    checksum_algorithm: str = "sha256",
    id: uuid.UUID | str | None = None,
    name: str | None = None,
    file_type: str = "",
    metadata: Mapping[str, Any] | None = None,
    verify: bool = True,
    actor: str,
) -> tuple[RawDataFile, bool]:
    """Register one raw file and its copy at its SOURCE location; returns ``(file, created)``.

    Checks, each an ``IngestError`` with nothing written: the instrument is available; the
    location is an active SOURCE; the relative path is safe (relative, no ``..``, resolves
    below the root, no control character or line separator, no component starting with "-");
    every text is a str that fits its column, is valid UTF-8 and (name, file type) holds no
    control character; size is an int from 0 to 2**63-1; the algorithm is known and the
    checksum is a hex digest of its length; ``metadata`` is a JSON object without NUL
    characters, NaN or infinity; the scan is running, completed or aborted
    (``REGISTRABLE_SCAN_STATUSES``), checked again under a row lock when the file is written.
    With ``verify`` and a disk location readable from here, the file must exist below the root
    with the stated size and checksum.

    Creates the RawDataFile and a ``present`` PhysicalCopy (``verified`` with the checksum and
    time when the bytes were checked) with its creation event, in one transaction. Repeating
    with the same ``id`` and identical data returns the existing file (``created`` False) without
    touching the disk; the same id with other data, or the same (location, path) under another
    id, raises ``IngestError``.
    """
    prepared = _prepare_file(
        executed_obs_unit=executed_obs_unit,
        instrument_module=instrument_module,
        source_location=source_location,
        relative_path=relative_path,
        size=size,
        checksum=checksum,
        checksum_algorithm=checksum_algorithm,
        id=id,
        name=name,
        file_type=file_type,
        metadata=metadata,
        verify=verify,
    )
    if prepared.existing is not None:
        return prepared.existing, False
    with transaction.atomic():
        return _write_file(prepared, actor=actor)


def raw_data_files_register_bulk(
    items: list[dict[str, Any]], *, actor: str
) -> list[tuple[RawDataFile, bool]]:
    """Register many files, all or nothing; returns ``(file, created)`` per item, in order.

    Each item holds the keyword arguments of ``raw_data_file_register`` (without ``actor``).
    Every item is validated and verified first (file I/O happens outside the transaction), then
    all are written in one transaction. The first bad item raises ``IngestError`` whose message
    starts with ``item <index>:``, and nothing is written.
    """
    prepared: list[_PreparedFile] = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise IngestError(f"item {index}: expected an object, got {type(item).__name__}")
        unknown = sorted(set(item) - _ITEM_FIELDS)
        missing = sorted(_REQUIRED_ITEM_FIELDS - set(item))
        if unknown or missing:
            problems = [f"unknown fields: {', '.join(unknown)}"] if unknown else []
            problems += [f"missing fields: {', '.join(missing)}"] if missing else []
            raise IngestError(f"item {index}: {'; '.join(problems)}")
        try:
            prepared.append(_prepare_file(**item))
        except IngestError as exc:
            raise IngestError(f"item {index}: {exc}") from exc
    results: list[tuple[RawDataFile, bool]] = []
    with transaction.atomic():
        # Lock every scan this request writes to up front, in primary-key order, so two bulk
        # requests over the same scans cannot deadlock; ``_write_file`` re-checks each one.
        _lock_scans(e.values["executed_obs_unit_id"] for e in prepared if e.existing is None)
        for index, entry in enumerate(prepared):
            if entry.existing is not None:
                results.append((entry.existing, False))
                continue
            try:
                results.append(_write_file(entry, actor=actor))
            except IngestError as exc:
                raise IngestError(f"item {index}: {exc}") from exc
    return results


def _prepare_file(
    *,
    executed_obs_unit: ExecutedObsUnit,
    instrument_module: InstrumentModule,
    source_location: DataLocation,
    relative_path: str,
    size: int,
    checksum: str,
    checksum_algorithm: str = "sha256",
    id: uuid.UUID | str | None = None,
    name: str | None = None,
    file_type: str = "",
    metadata: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> _PreparedFile:
    """Validate one registration (and verify its bytes) without writing anything."""
    file_id = _parse_uuid(id, "raw data file id") if id is not None else uuid.uuid4()
    if not isinstance(relative_path, str):
        raise IngestError(f"relative_path must be a string, got {type(relative_path).__name__}")
    try:
        path = normalize_relative_path(relative_path)
    except UnsafePath as exc:
        raise IngestError(f"relative_path rejected: {exc}") from exc
    if len(path) > _RELATIVE_PATH_MAX:
        raise IngestError(f"relative_path is longer than {_RELATIVE_PATH_MAX} characters")
    problem = _path_problem(path)
    if problem:
        raise IngestError(f"relative_path rejected: {problem}")
    if name is None:
        file_name = path.rsplit("/", 1)[-1]
        if len(file_name) > _NAME_MAX:
            raise IngestError(f"name is longer than {_NAME_MAX} characters")
    else:
        file_name = _short_text(name, "name", _NAME_MAX)
        if not file_name:
            raise IngestError("name must not be empty")
    if isinstance(size, bool) or not isinstance(size, int):
        raise IngestError(f"size must be an integer number of bytes, got {size!r}")
    if size < 0:
        raise IngestError(f"size must not be negative, got {size}")
    if size > _SIZE_MAX:
        raise IngestError(f"size {size} is larger than {_SIZE_MAX}, the largest size stored")
    if not isinstance(checksum_algorithm, str):
        raise IngestError(
            f"checksum_algorithm must be a string, got {type(checksum_algorithm).__name__}"
        )
    if checksum_algorithm not in checksums.ALGORITHMS:
        known = ", ".join(sorted(checksums.ALGORITHMS))
        raise IngestError(f"unknown checksum algorithm {checksum_algorithm!r} (known: {known})")
    if not isinstance(checksum, str):
        raise IngestError(f"checksum must be a string, got {type(checksum).__name__}")
    digest = checksum.strip().lower()
    if not checksums.is_valid_hex_digest(digest, checksum_algorithm):
        raise IngestError(
            f"checksum {checksum!r} is not a {checksums.hex_length(checksum_algorithm)}-character "
            f"hex digest, as {checksum_algorithm} requires"
        )
    file_type = _short_text(file_type, "file_type", _FILE_TYPE_MAX)
    file_metadata = _json_object(metadata, "metadata")

    values: dict[str, Any] = {
        "id": file_id,
        "executed_obs_unit_id": executed_obs_unit.pk,
        "instrument_module_id": instrument_module.pk,
        "source_location_id": source_location.pk,
        "relative_path": path,
        "name": file_name,
        "size": size,
        "checksum": digest,
        "checksum_algorithm": checksum_algorithm,
        "file_type": file_type,
        "metadata": file_metadata,
    }

    # An identical repeat succeeds even if the world changed since (instrument taken offline,
    # file already packaged and removed from the source): it asks nothing new of us.
    existing = RawDataFile.objects.filter(pk=file_id).first()
    if existing is not None:
        return _PreparedFile(values, "", existing=_same_file(existing, values))
    _check_path_free(values)

    instrument = instrument_module.instrument
    if not instrument.available:
        raise IngestError(
            f"instrument {instrument.name!r} is not available (commissioning or maintenance); "
            "its files are not accepted"
        )
    if source_location.location_type != DataLocation.LocationType.SOURCE:
        raise IngestError(
            f"location {source_location} is a {source_location.location_type} location; raw "
            "files are registered at a SOURCE location"
        )
    if not source_location.active:
        raise IngestError(f"location {source_location} is not active")
    # Checked before the (long) verification so a known-bad scan costs no disk reads, and again
    # under a row lock when the file is written (``_write_file``).
    _check_scan_accepts_files(executed_obs_unit.pk)

    verified = ""
    root = _readable_root(source_location)
    if root is not None:
        try:
            full_path = safe_join(root, path)
        except UnsafePath as exc:
            raise IngestError(f"relative_path rejected: {exc}") from exc
        except (RuntimeError, OSError) as exc:
            # A symlink loop below the root (pathlib raises RuntimeError for it before Python
            # 3.13) or a directory this process may not search.
            raise IngestError(
                f"relative_path {path!r} cannot be resolved below the location root: {exc}"
            ) from exc
        if verify:
            verified = _verify_on_disk(
                full_path, size=size, checksum=digest, algorithm=checksum_algorithm
            )
    return _PreparedFile(values, verified)


_ITEM_FIELDS = frozenset(inspect.signature(_prepare_file).parameters)
_REQUIRED_ITEM_FIELDS = frozenset(
    name
    for name, parameter in inspect.signature(_prepare_file).parameters.items()
    if parameter.default is inspect.Parameter.empty
)


def _write_file(prepared: _PreparedFile, *, actor: str) -> tuple[RawDataFile, bool]:
    """Insert the file and its source copy. Runs inside the caller's transaction."""
    values = prepared.values
    # Re-checked here because a bulk request may repeat an id or a path among its own items,
    # and a concurrent request may have written since validation.
    existing = RawDataFile.objects.filter(pk=values["id"]).first()
    if existing is not None:
        return _same_file(existing, values), False
    # The scan may have been declared failed while the file was verified. Its row stays locked
    # until this transaction ends, so a concurrent ``transition`` waits for the file to be
    # written (and the file then belongs to a scan that failed after it arrived).
    _check_scan_accepts_files(values["executed_obs_unit_id"], lock=True)
    _check_path_free(values)
    try:
        with transaction.atomic():
            raw_file = RawDataFile.objects.create(**values)
            now = timezone.now()
            copy = PhysicalCopy.objects.create(
                kind=PhysicalCopy.Kind.RAW_DATA_FILE,
                raw_data_file=raw_file,
                location_id=values["source_location_id"],
                relative_path=values["relative_path"],
                status=PhysicalCopyStatus.PRESENT,
                integrity=(
                    PhysicalCopy.Integrity.VERIFIED
                    if prepared.verified_checksum
                    else PhysicalCopy.Integrity.UNVERIFIED
                ),
                verified_checksum=prepared.verified_checksum,
                checksum_verified_at=now if prepared.verified_checksum else None,
            )
            record_creation(
                copy,
                actor=actor,
                reason=(
                    "raw file registered; size and checksum verified at the source"
                    if prepared.verified_checksum
                    else "raw file registered; checksum not verified yet"
                ),
            )
    except IntegrityError as exc:
        # Another delivery of the same request may have inserted this id since the check above;
        # answer it as the repeat it is (or refuse it as a contradiction), like a sequential one.
        winner = RawDataFile.objects.filter(pk=values["id"]).first()
        if winner is not None:
            return _same_file(winner, values), False
        raise IngestError(
            f"raw data file {values['id']} at {values['relative_path']!r} conflicts with a row "
            f"written concurrently ({exc})"
        ) from exc
    return raw_file, True


def _check_scan_accepts_files(scan_id: uuid.UUID, *, lock: bool = False) -> None:
    """Raise ``IngestError`` unless the scan exists and is in ``REGISTRABLE_SCAN_STATUSES``.

    With ``lock`` the scan row is locked (``SELECT ... FOR UPDATE``) until the caller's
    transaction ends; the caller must be inside one.
    """
    if lock:
        _lock_scans([scan_id])
    status = ExecutedObsUnit.objects.filter(pk=scan_id).values_list("status", flat=True).first()
    if status is None:
        raise IngestError(f"executed obs unit {scan_id} does not exist")
    if status not in REGISTRABLE_SCAN_STATUSES:
        raise IngestError(
            f"executed obs unit {scan_id} is {status}; files are accepted only "
            f"while it is {', '.join(REGISTRABLE_SCAN_STATUSES)}"
        )


def _lock_scans(scan_ids: Iterable[uuid.UUID]) -> None:
    """Lock these scan rows until the transaction ends (a no-op on SQLite, whose writers are
    serialised anyway). Rows are locked in primary-key order."""
    ids = set(scan_ids)
    if ids:
        list(
            ExecutedObsUnit.objects.select_for_update()
            .filter(pk__in=ids)
            .order_by("pk")
            .values_list("pk", flat=True)
        )


def _same_file(existing: RawDataFile, values: dict[str, Any]) -> RawDataFile:
    differences = [
        f"{field} {getattr(existing, field)!r} != {values[field]!r}"
        for field in _IDENTITY_FIELDS
        if not (
            _same_json(getattr(existing, field), values[field])
            if field == "metadata"
            else getattr(existing, field) == values[field]
        )
    ]
    if differences:
        raise IngestError(
            f"raw data file {existing.pk} is already registered with different data: "
            + "; ".join(differences)
        )
    return existing


def _same_json(stored: Any, given: Any) -> bool:
    """True when ``given`` (cleaned by ``_json_object``) is what the database gave back as
    ``stored``.

    PostgreSQL's jsonb keeps numbers as exact decimals and prints them without an exponent, so
    6.02214076e23 is read back as the int 602214076000000000000000: numbers are compared by
    their exact decimal value (``Decimal(repr(float))``, the text that was sent). A bool is not
    a number here, as in JSON, and ``True`` does not equal ``1``.
    """
    if isinstance(stored, bool) or isinstance(given, bool):
        return type(stored) is type(given) and stored == given
    if isinstance(stored, int | float) and isinstance(given, int | float):
        return _exact_number(stored) == _exact_number(given)
    if isinstance(stored, dict) and isinstance(given, dict):
        return stored.keys() == given.keys() and all(
            _same_json(stored[key], given[key]) for key in stored
        )
    if isinstance(stored, list) and isinstance(given, list):
        return len(stored) == len(given) and all(map(_same_json, stored, given))
    if isinstance(stored, dict | list) or isinstance(given, dict | list):
        return False
    return bool(stored == given)


def _exact_number(number: int | float) -> Decimal:
    return Decimal(repr(number)) if isinstance(number, float) else Decimal(number)


def _check_path_free(values: dict[str, Any]) -> None:
    other = (
        RawDataFile.objects.filter(
            source_location_id=values["source_location_id"],
            relative_path=values["relative_path"],
        )
        .exclude(pk=values["id"])
        .values_list("pk", flat=True)
        .first()
    )
    if other is not None:
        raise IngestError(
            f"{values['relative_path']!r} at this location is already registered as raw data "
            f"file {other}"
        )


def _readable_root(location: DataLocation) -> Path | None:
    """The location's root when it is a disk this process can read, else None.

    A disk location with a host other than this one is read by the workers on that host; a
    local root that does not exist here is a mount this process does not have (the API host
    is often not the instrument computer). Both are verified later by the integrity manager.
    """
    if location.storage_type != DataLocation.StorageType.DISK or not location.root_path:
        return None
    if location.host and location.host not in _local_hostnames():
        return None
    root = Path(location.root_path)
    try:
        return root if root.is_dir() else None
    except OSError:  # e.g. permission denied on a parent: not readable from here
        return None


def _local_hostnames() -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    return names


def _verify_on_disk(full_path: Path, *, size: int, checksum: str, algorithm: str) -> str:
    """Check the file's size and checksum; return the checksum read, or raise IngestError."""
    try:
        stat = os.stat(full_path)
    except FileNotFoundError:
        raise IngestError(f"file {full_path} does not exist at the source location") from None
    except OSError as exc:
        raise IngestError(f"file {full_path} cannot be read: {exc}") from exc
    if not os.path.isfile(full_path):
        raise IngestError(f"{full_path} is not a regular file")
    if stat.st_size != size:
        raise IngestError(
            f"size mismatch for {full_path}: expected {size} bytes, found {stat.st_size}"
        )
    try:
        actual, read = checksums.checksum_and_size(full_path, algorithm)
    except OSError as exc:
        raise IngestError(f"file {full_path} cannot be read: {exc}") from exc
    if read != size:
        raise IngestError(
            f"size mismatch for {full_path}: expected {size} bytes, read {read} (file changing?)"
        )
    if actual != checksum:
        raise IngestError(
            f"checksum mismatch for {full_path}: expected {algorithm} {checksum}, actual {actual}"
        )
    return actual


# --- Small parsers --------------------------------------------------------------------------------
def _path_problem(path: str) -> str:
    """Why a normalized relative path cannot be stored and listed, or "" if it can.

    Paths are written one a line into the ``--files-from`` lists of tar and rsync and passed as
    their arguments, so a line break or other control character would split one path into
    two, and a component starting with "-" would be read as an option.
    """
    if not _is_utf8(path):
        return f"{path!r} is not valid UTF-8 (it holds a lone surrogate)"
    bad = _first_control_character(path)
    if bad:
        return f"{path!r} contains a {_describe_character(bad)}; paths are listed one a line"
    for part in path.split("/"):
        if part.startswith("-"):
            return (
                f"{path!r}: component {part!r} starts with '-', which tar and rsync would "
                "read as an option"
            )
    return ""


def _short_text(value: object, what: str, max_length: int) -> str:
    """``value`` when it is a string of at most ``max_length`` characters that the database can
    store (UTF-8) and that holds no control character; else ``IngestError``."""
    if not isinstance(value, str):
        raise IngestError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise IngestError(f"{what} is longer than {max_length} characters")
    if not _is_utf8(value):
        raise IngestError(f"{what} {value!r} is not valid UTF-8 (it holds a lone surrogate)")
    bad = _first_control_character(value)
    if bad:
        raise IngestError(f"{what} {value!r} contains a {_describe_character(bad)}")
    return str(value)


def _is_utf8(text: str) -> bool:
    # A lone surrogate ("\ud800") is a valid Python str but not UTF-8: drivers raise
    # UnicodeEncodeError and jsonb rejects its \u escape.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_control_character(text: str) -> str:
    """The first C0/C1 control character or line/paragraph separator in ``text``, or ""."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return char
    return ""


def _describe_character(char: str) -> str:
    kind = "control character" if unicodedata.category(char) == "Cc" else unicodedata.name(char)
    return f"{kind.lower()} (U+{ord(char):04X})"


def _json_object(value: object, field: str) -> dict[str, Any]:
    """A JSON object field (``metadata``, ``conditions``) as it will be stored: a plain dict of
    str, finite float, int, bool, None, lists and dicts (tuples become lists). ``None`` is
    ``{}``. Raises ``IngestError`` naming the offending place for anything else, and for what
    PostgreSQL's jsonb refuses: NUL characters and lone surrogates, in keys or values."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise IngestError(f"{field} must be a JSON object, got {type(value).__name__}")
    cleaned: dict[str, Any] = _json_value(value, field, field, 0)
    return cleaned


def _json_value(value: object, where: str, field: str, depth: int) -> Any:
    if depth > _JSON_MAX_DEPTH:
        raise IngestError(f"{field} is nested deeper than {_JSON_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= _JSON_INT_LIMIT:
            raise IngestError(f"{where} is an integer of more than {_JSON_INT_DIGITS} digits")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise IngestError(f"{where} is {value!r}; JSON has no NaN or infinity")
        return float(value)
    if isinstance(value, str):
        _check_json_string(value, where)
        return str(value)
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise IngestError(f"{where} key {key!r} is not a string")
            _check_json_string(key, f"{where} key {key!r}")
            result[str(key)] = _json_value(item, f"{where}[{key!r}]", field, depth + 1)
        return result
    if isinstance(value, list | tuple):
        return [
            _json_value(item, f"{where}[{index}]", field, depth + 1)
            for index, item in enumerate(value)
        ]
    raise IngestError(f"{where} is a {type(value).__name__}, which JSON cannot hold")


def _check_json_string(text: str, where: str) -> None:
    if "\x00" in text:
        raise IngestError(f"{where} contains a NUL character, which the database cannot store")
    if not _is_utf8(text):
        raise IngestError(f"{where} is not valid UTF-8 (it holds a lone surrogate)")


def _parse_uuid(value: uuid.UUID | str, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise IngestError(f"{what} {value!r} is not a UUID") from None


def _require_aware(value: datetime, what: str) -> None:
    if not isinstance(value, datetime):
        raise IngestError(f"{what} must be a datetime, got {type(value).__name__}")
    if timezone.is_naive(value):
        raise IngestError(f"{what} {value.isoformat()} has no time zone; send UTC or an offset")
    try:
        # Stored in UTC: near year 1 or 9999 an offset can carry it out of range (SQLite's
        # adapter raises OverflowError, PostgreSQL would store it).
        value.astimezone(UTC)
    except OverflowError:
        raise IngestError(f"{what} {value.isoformat()} is out of range in UTC") from None
