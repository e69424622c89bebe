"""Ingest against a scan that changes state while a file is being verified.

Verifying a file reads all its bytes, which takes seconds to minutes; the instrument control
system may declare the scan failed meanwhile. The registration must then be refused, and on
PostgreSQL the scan row is locked while the file is written so the two cannot interleave.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import OperationalError, connection, transaction

from pipelines.exceptions import IngestError
from pipelines.models import DataLocation, ExecutedObsUnit, RawDataFile, StateEvent
from pipelines.services import ingest
from pipelines.services.ingest import raw_data_file_register, raw_data_files_register_bulk
from pipelines.services.states import transition
from pipelines.storage import checksums
from tests import factories as f
from tests.pipelines.ingest.conftest import T0
from tests.pipelines.ingest.test_ingest import _counts, _file_kwargs

pytestmark = pytest.mark.django_db

ObsStatus = ExecutedObsUnit.ObsStatus


def _finish_during_checksum(
    monkeypatch: pytest.MonkeyPatch, scan: ExecutedObsUnit, status: str, *, on_path: str = ""
) -> None:
    """Make the scan move to ``status`` while a file's checksum is computed (for the file whose
    path ends with ``on_path``), through the one state writer, then let the checksum finish."""
    real = checksums.checksum_and_size

    def checksum_while_the_scan_ends(path: Any, algorithm: str = "sha256", **kw: Any) -> Any:
        if str(path).endswith(on_path):
            current = ExecutedObsUnit.objects.get(pk=scan.pk)
            transition(current, status, actor="ics", reason="declared by the control system")
        return real(path, algorithm, **kw)

    monkeypatch.setattr(checksums, "checksum_and_size", checksum_while_the_scan_ends)


def test_it_refuses_a_file_whose_scan_failed_while_its_checksum_was_computed(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = _file_kwargs(scan, module, source)
    _finish_during_checksum(monkeypatch, scan, ObsStatus.FAILED)
    before = _counts()

    with pytest.raises(
        IngestError, match=rf"^executed obs unit {scan.pk} is failed; files are accepted only"
    ):
        raw_data_file_register(**kwargs, actor="api")

    # Only the scan's own failure was written.
    assert _counts() == {**before, "events": before["events"] + 1}
    assert not RawDataFile.objects.filter(pk=kwargs["id"]).exists()
    assert StateEvent.objects.latest("pk").to_state == ObsStatus.FAILED


@pytest.mark.parametrize("status", [ObsStatus.COMPLETED, ObsStatus.ABORTED])
def test_it_accepts_a_file_whose_scan_ended_normally_while_its_checksum_was_computed(
    scan: ExecutedObsUnit,
    module: Any,
    source: DataLocation,
    monkeypatch: pytest.MonkeyPatch,
    status: str,
) -> None:
    kwargs = _file_kwargs(scan, module, source)
    _finish_during_checksum(monkeypatch, scan, status)

    _, created = raw_data_file_register(**kwargs, actor="api")

    assert created is True
    assert RawDataFile.objects.get(pk=kwargs["id"]).executed_obs_unit_id == scan.pk


def test_it_refuses_a_bulk_whose_second_scan_failed_during_verification_and_writes_nothing(
    scan: ExecutedObsUnit, module: Any, source: DataLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_scan = f.ExecutedObsUnitFactory(start_time=T0)
    items = [
        _file_kwargs(scan, module, source, "bulk/a.fits", b"a" * 40),
        _file_kwargs(other_scan, module, source, "bulk/b.fits", b"b" * 40),
    ]
    _finish_during_checksum(monkeypatch, other_scan, ObsStatus.FAILED, on_path="b.fits")
    before = _counts()

    with pytest.raises(IngestError, match=rf"^item 1: executed obs unit {other_scan.pk} is failed"):
        raw_data_files_register_bulk(items, actor="api")

    assert _counts() == {**before, "events": before["events"] + 1}
    assert not RawDataFile.objects.exists()
    scan.refresh_from_db()
    assert scan.status == ObsStatus.RUNNING


def test_a_bulk_repeat_of_files_already_registered_is_still_answered_after_the_scan_failed(
    scan: ExecutedObsUnit, module: Any, source: DataLocation
) -> None:
    # The lock and re-check guard new rows only: an identical repeat asks nothing new.
    items = [_file_kwargs(scan, module, source, f"bulk/{n}.fits", bytes([n]) * 8) for n in (1, 2)]
    raw_data_files_register_bulk(items, actor="api")
    transition(scan, ObsStatus.FAILED, actor="ics")
    before = _counts()

    results = raw_data_files_register_bulk(items, actor="api")

    assert [created for _, created in results] == [False, False]
    assert _counts() == before


@pytest.mark.django_db(transaction=True)
def test_on_postgres_a_concurrent_scan_failure_waits_until_the_file_is_written(
    require_postgres: None,
    scan: ExecutedObsUnit,
    module: Any,
    source: DataLocation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # While ingest writes the file, another connection tries to fail the scan. Inserting the
    # file alone takes only a key-share lock on the scan, which an UPDATE of its status does not
    # wait for; ingest's row lock makes that UPDATE wait (here: time out) until the commit.
    kwargs = _file_kwargs(scan, module, source)
    outcome: list[BaseException | str] = []
    real_record_creation = ingest.record_creation

    def fail_the_scan_elsewhere() -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = '300ms'")
                transition(ExecutedObsUnit.objects.get(pk=scan.pk), ObsStatus.FAILED, actor="ics")
            outcome.append("failed the scan")
        except BaseException as exc:
            outcome.append(exc)
        finally:
            connection.close()

    def record_creation_while_another_connection_fails_the_scan(*args: Any, **kw: Any) -> Any:
        other = threading.Thread(target=fail_the_scan_elsewhere)
        other.start()
        other.join(timeout=10)
        return real_record_creation(*args, **kw)

    monkeypatch.setattr(
        ingest, "record_creation", record_creation_while_another_connection_fails_the_scan
    )

    raw, created = raw_data_file_register(**kwargs, actor="api")

    assert created is True
    assert len(outcome) == 1
    assert isinstance(outcome[0], OperationalError), outcome
    assert "lock timeout" in str(outcome[0])
    scan.refresh_from_db()
    assert scan.status == ObsStatus.RUNNING
    assert RawDataFile.objects.filter(pk=raw.pk, executed_obs_unit=scan).exists()
    # After the commit the failure goes through (the file was registered before it).
    transition(scan, ObsStatus.FAILED, actor="ics")
    assert ExecutedObsUnit.objects.get(pk=scan.pk).status == ObsStatus.FAILED
