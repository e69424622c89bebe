"""Ingest refuses bad input up front with an IngestError, the same on SQLite and PostgreSQL.

Each case here used to reach the database or the file system and fail there with a
DataError, OverflowError, UnicodeEncodeError, TypeError or RuntimeError (a 500 for the API),
or, for control characters and leading dashes in paths, to be stored and break the tar and
rsync ``--files-from`` lists built from them later.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from pipelines.exceptions import IngestError
from pipelines.models import DataLocation, ExecutedObsUnit, RawDataFile
from pipelines.services.ingest import (
    executed_obs_unit_finish,
    executed_obs_unit_start,
    raw_data_file_register,
    raw_data_files_register_bulk,
)
from tests import factories as f
from tests.pipelines.ingest.conftest import T0
from tests.pipelines.ingest.test_ingest import _counts, _file_kwargs

pytestmark = pytest.mark.django_db

ObsStatus = ExecutedObsUnit.ObsStatus
BIGINT_MAX = 2**63 - 1


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


# (overrides of a valid, unverified registration, message). Without ``verify`` nothing reads the
# disk, so each value reaches the database unless ingest refuses it first.
BAD_INPUT: list[tuple[dict[str, Any], str]] = [
    ({"size": 2**63}, r"size 9223372036854775808 is larger than 9223372036854775807"),
    ({"size": 2**70}, r"size \d+ is larger than"),
    ({"size": -1}, "size must not be negative"),
    ({"size": "12"}, "size must be an integer number of bytes, got '12'"),
    ({"size": 12.0}, "size must be an integer number of bytes, got 12.0"),
    ({"size": True}, "size must be an integer number of bytes, got True"),
    ({"size": None}, "size must be an integer number of bytes, got None"),
    ({"file_type": "f" * 51}, "file_type is longer than 50 characters"),
    ({"file_type": None}, "file_type must be a string, got NoneType"),
    ({"file_type": "fi\x00ts"}, r"file_type 'fi\\x00ts' contains a control character"),
    ({"file_type": "fits\ud800"}, r"file_type 'fits\\ud800' is not valid UTF-8"),
    ({"name": "n" * 256}, "name is longer than 255 characters"),
    ({"name": ""}, "name must not be empty"),
    ({"name": "a\nb.fits"}, r"name 'a\\nb.fits' contains a control character"),
    ({"name": "\udcff.fits"}, r"name '\\udcff.fits' is not valid UTF-8"),
    ({"name": 7}, "name must be a string, got int"),
    ({"checksum": 7}, "checksum must be a string, got int"),
    ({"checksum_algorithm": ["sha256"]}, "checksum_algorithm must be a string, got list"),
    ({"metadata": {"a\x00": 1}}, r"metadata key 'a\\x00' contains a NUL character"),
    ({"metadata": {"a": "b\x00"}}, r"metadata\['a'\] contains a NUL character"),
    (
        {"metadata": {"a": {"b": ["c", "d\x00e"]}}},
        r"metadata\['a'\]\['b'\]\[1\] contains a NUL character",
    ),
    ({"metadata": {"\ud800": 1}}, r"metadata key '\\ud800' is not valid UTF-8"),
    ({"metadata": {"a": ["ok", "\udfff"]}}, r"metadata\['a'\]\[1\] is not valid UTF-8"),
    ({"metadata": {"a": float("nan")}}, r"metadata\['a'\] is nan; JSON has no NaN or infinity"),
    ({"metadata": {"a": float("-inf")}}, r"metadata\['a'\] is -inf"),
    ({"metadata": {"a": {1, 2}}}, r"metadata\['a'\] is a set, which JSON cannot hold"),
    ({"metadata": {"a": b"bytes"}}, r"metadata\['a'\] is a bytes, which JSON cannot hold"),
    ({"metadata": {1: "x"}}, "metadata key 1 is not a string"),
    ({"metadata": {"a": 10**5000}}, r"metadata\['a'\] is an integer of more than 1000 digits"),
    ({"metadata": _nested(5000)}, "metadata is nested deeper than 64 levels"),
    ({"metadata": "subscan=1"}, "metadata must be a JSON object, got str"),
    ({"metadata": [["subscan", 1]]}, "metadata must be a JSON object, got list"),
    ({"relative_path": 42}, "relative_path must be a string, got int"),
    ({"relative_path": None}, "relative_path must be a string, got NoneType"),
    (
        {"relative_path": "raw/\ud800.fits"},
        r"relative_path rejected: 'raw/\\ud800.fits' is not valid UTF-8",
    ),
    ({"relative_path": "raw/a\nb.fits"}, r"relative_path rejected: .*control character"),
    ({"relative_path": "raw/a.fits\r"}, r"relative_path rejected: .*control character"),
    ({"relative_path": "raw/\ta.fits"}, r"relative_path rejected: .*control character"),
    ({"relative_path": "raw/a\x7f.fits"}, r"relative_path rejected: .*control character"),
    ({"relative_path": "raw/a\x85.fits"}, r"relative_path rejected: .*control character"),
    ({"relative_path": "raw/a\u2028.fits"}, r"relative_path rejected: .*line separator"),
    ({"relative_path": "-rf.fits"}, r"relative_path rejected: .*'-rf.fits' starts with '-'"),
    ({"relative_path": "raw/--files-from=x"}, r"relative_path rejected: .*starts with '-'"),
    ({"relative_path": "raw/-v/a.fits"}, r"relative_path rejected: .*'-v' starts with '-'"),
    ({"relative_path": "r" * 1001}, "relative_path is longer than 1000 characters"),
]
BAD_INPUT_IDS = [f"{next(iter(o))}-{n}" for n, (o, _) in enumerate(BAD_INPUT)]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT, ids=BAD_INPUT_IDS)
def test_it_refuses_bad_input_with_an_ingest_error_and_writes_nothing(
    scan: ExecutedObsUnit,
    module: Any,
    source: DataLocation,
    overrides: dict[str, Any],
    message: str,
) -> None:
    kwargs = _file_kwargs(scan, module, source, write=False, verify=False, **overrides)
    before = _counts()

    with pytest.raises(IngestError, match=f"^{message}"):
        raw_data_file_register(**kwargs, actor="api")

    assert _counts() == before
    assert not RawDataFile.objects.filter(pk=kwargs["id"]).exists()


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT, ids=BAD_INPUT_IDS)
def test_it_refuses_a_bulk_with_one_bad_item_naming_the_item(
    scan: ExecutedObsUnit,
    module: Any,
    source: DataLocation,
    overrides: dict[str, Any],
    message: str,
) -> None:
    good = _file_kwargs(scan, module, source, "good/a.fits", write=False, verify=False)
    bad = _file_kwargs(scan, module, source, write=False, verify=False, **overrides)
    before = _counts()

    with pytest.raises(IngestError, match=f"^item 1: {message}"):
        raw_data_files_register_bulk([good, bad], actor="api")

    assert _counts() == before


def test_it_accepts_the_largest_values_the_columns_hold(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    relative = "r/" + "p" * 998
    kwargs = _file_kwargs(
        scan,
        module,
        source,
        relative,
        write=False,
        verify=False,
        size=BIGINT_MAX,
        file_type="f" * 50,
        name="n" * 255,
        metadata={"comment": "two\nlines\ttabbed", "unicode": "Ω ☃ 😀", "depth": _nested(60)},
    )

    raw, created = raw_data_file_register(**kwargs, actor="api")

    assert created is True
    raw.refresh_from_db()
    assert (raw.size, raw.file_type, raw.name, raw.relative_path) == (
        BIGINT_MAX,
        "f" * 50,
        "n" * 255,
        relative,
    )
    assert raw.metadata == kwargs["metadata"]


def test_it_stores_tuples_in_metadata_as_lists_and_accepts_the_repeat(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    kwargs = _file_kwargs(scan, module, source, metadata={"offsets": (1, 2)})
    raw_data_file_register(**kwargs, actor="api")

    again, created = raw_data_file_register(**kwargs, actor="api")

    assert created is False
    again.refresh_from_db()
    assert again.metadata == {"offsets": [1, 2]}


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("relative", ["loop/x.fits", "loop", "a/b/loop/x.fits"])
def test_it_refuses_a_path_through_a_symlink_loop(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, relative: str, verify: bool
) -> None:
    root = Path(source.root_path)
    loop_dir = root / relative.rsplit("loop", 1)[0]
    loop_dir.mkdir(parents=True, exist_ok=True)
    os.symlink("loop", loop_dir / "loop")
    kwargs = _file_kwargs(scan, module, source, relative, write=False, verify=verify)
    before = _counts()

    with pytest.raises(IngestError, match=r"relative_path .* cannot be resolved|cannot be read"):
        raw_data_file_register(**kwargs, actor="api")

    assert _counts() == before


def test_it_refuses_a_symlink_loop_in_a_bulk_naming_the_item(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    os.symlink("loop", Path(source.root_path) / "loop")
    good = _file_kwargs(scan, module, source, "good/a.fits")
    bad = _file_kwargs(scan, module, source, "loop/x.fits", write=False)
    before = _counts()

    with pytest.raises(IngestError, match=r"^item 1: relative_path 'loop/x.fits' cannot be"):
        raw_data_files_register_bulk([good, bad], actor="api")

    assert _counts() == before


# --- Scans ----------------------------------------------------------------------------------------
BAD_JSON: list[tuple[Any, str]] = [
    ({"observer": "night\x00shift"}, r"\['observer'\] contains a NUL character"),
    ({"a\x00": 1}, r" key 'a\\x00' contains a NUL character"),
    ({"observer": "\ud800"}, r"\['observer'\] is not valid UTF-8"),
    ({"pwv": float("nan")}, r"\['pwv'\] is nan"),
    ({"when": T0}, r"\['when'\] is a datetime, which JSON cannot hold"),
    ("pwv=0.5", " must be a JSON object, got str"),
]
BAD_JSON_IDS = ["nul-value", "nul-key", "surrogate", "nan", "datetime", "not-an-object"]


@pytest.mark.parametrize("field", ["metadata", "conditions"])
@pytest.mark.parametrize(("value", "message"), BAD_JSON, ids=BAD_JSON_IDS)
def test_it_refuses_a_scan_start_with_json_the_database_cannot_store(
    field: str, value: Any, message: str
) -> None:
    obs_unit = f.ObsUnitFactory()
    before = _counts()

    with pytest.raises(IngestError, match=f"^{field}{message}"):
        executed_obs_unit_start(obs_unit=obs_unit, start_time=T0, actor="api", **{field: value})

    assert _counts() == before


@pytest.mark.parametrize(("value", "message"), BAD_JSON, ids=BAD_JSON_IDS)
def test_it_refuses_a_scan_finish_with_conditions_the_database_cannot_store(
    scan: ExecutedObsUnit, value: Any, message: str
) -> None:
    before = _counts()

    with pytest.raises(IngestError, match=f"^conditions{message}"):
        executed_obs_unit_finish(
            scan, end_time=T0 + timedelta(minutes=5), conditions=value, actor="api"
        )

    assert _counts() == before
    scan.refresh_from_db()
    assert (scan.status, scan.end_time, scan.conditions) == (ObsStatus.RUNNING, None, {})


EDGE_OF_TIME = [
    datetime.min.replace(tzinfo=timezone(timedelta(hours=5))),
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
]


@pytest.mark.parametrize("when", EDGE_OF_TIME, ids=["year-1-east", "year-9999-west"])
def test_it_refuses_a_scan_start_that_is_out_of_range_in_utc(when: datetime) -> None:
    obs_unit = f.ObsUnitFactory()
    before = _counts()

    with pytest.raises(IngestError, match=r"^start_time .* is out of range in UTC"):
        executed_obs_unit_start(obs_unit=obs_unit, start_time=when, actor="api")

    assert _counts() == before


def test_it_refuses_a_scan_finish_that_is_out_of_range_in_utc(scan: ExecutedObsUnit) -> None:
    before = _counts()

    with pytest.raises(IngestError, match=r"^end_time .* is out of range in UTC"):
        executed_obs_unit_finish(scan, end_time=EDGE_OF_TIME[1], actor="api")

    assert _counts() == before
    scan.refresh_from_db()
    assert (scan.status, scan.end_time) == (ObsStatus.RUNNING, None)
