"""Damage behind the system's back, found by the integrity manager run by real beat and worker
processes (see ``harness``): a byte flipped in a long-term archive copy, and an archive copy's
file removed. Each is detected by re-verification, repaired in place from a verified good copy
(never from the damaged one), and ends VERIFIED with the original bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .harness import Facility, all_archived, file_sha256, wait_for

ARCHIVED_WITHIN = 150
REPAIRED_WITHIN = 60


def archive_copy(facility: Facility, site: str) -> dict[str, Any]:
    """The first package's verified copy in ``site``'s long-term archive, with its file path."""
    [(copy_id, location_id, relative_path, root, checksum)] = facility.sql(
        "SELECT c.id, l.id, c.relative_path, l.root_path, p.checksum FROM physical_copy c "
        "JOIN data_location l ON l.id = c.location_id JOIN site s ON s.id = l.site_id "
        "JOIN raw_data_package p ON p.id = c.raw_data_package_id "
        "WHERE s.short_name = %s AND l.location_type = 'long_term_archive' "
        "AND c.status = 'present' AND c.integrity = 'verified' ORDER BY c.id LIMIT 1",
        (site,),
    )
    return {
        "id": copy_id,
        "location_id": location_id,
        "path": Path(root) / relative_path,
        "checksum": checksum,
    }


def re_verify_every_second(facility: Facility, location_id: int) -> None:
    """An operator shortens the location's verification interval: every copy there is due."""
    facility.sql_write(
        "UPDATE data_location SET verification_interval = interval '1 second' WHERE id = %s",
        (location_id,),
    )


def integrity_events(facility: Facility, copy_id: int) -> list[tuple[str, str, str, str]]:
    return [
        (row[0], row[1], row[2], row[3])
        for row in facility.sql(
            "SELECT from_state, to_state, actor, reason FROM state_event "
            "WHERE entity = 'physical_copy' AND object_id = %s AND field = 'integrity' "
            "ORDER BY id",
            (str(copy_id),),
        )
    ]


def repaired(facility: Facility, copy_id: int) -> bool:
    rows = facility.sql(
        "SELECT c.integrity, r.status FROM physical_copy c "
        "JOIN copy_repair r ON r.physical_copy_id = c.id WHERE c.id = %s",
        (copy_id,),
    )
    return bool(rows) and all(r == ("verified", "completed") for r in rows)


def assert_repaired_from_a_good_copy(facility: Facility, damaged: dict[str, Any]) -> None:
    [(source_id,)] = facility.sql(
        "SELECT source_copy_id FROM copy_repair WHERE physical_copy_id = %s",
        (damaged["id"],),
    )
    assert source_id is not None and source_id != damaged["id"]
    [(source_integrity, source_status)] = facility.sql(
        "SELECT integrity, status FROM physical_copy WHERE id = %s", (source_id,)
    )
    assert (source_integrity, source_status) == ("verified", "present")
    # No repair anywhere ever read from the damaged copy.
    assert facility.sql(
        "SELECT count(*) FROM copy_repair WHERE source_copy_id = %s", (damaged["id"],)
    ) == [(0,)]
    assert file_sha256(damaged["path"]) == damaged["checksum"]
    leftovers = [p.name for p in damaged["path"].parent.iterdir() if ".repair-" in p.name]
    assert leftovers == []
    moves = [(e[0], e[1]) for e in integrity_events(facility, damaged["id"])]
    assert moves[-1][1] == "verified"
    assert f"from copy {source_id}" in integrity_events(facility, damaged["id"])[-1][3]


def test_a_flipped_byte_in_an_archive_copy_is_found_and_repaired_from_a_good_copy(
    facility: Facility,
) -> None:
    facility.load_demo(scans=1)
    facility.start_beat("beat")
    facility.start_worker("worker", concurrency=2)
    wait_for(lambda: all_archived(facility), timeout=ARCHIVED_WITHIN, what="every package archived")

    damaged = archive_copy(facility, "cologne")
    with open(damaged["path"], "r+b") as handle:
        handle.seek(512)
        byte = handle.read(1)
        handle.seek(512)
        handle.write(bytes([byte[0] ^ 0x01]))
    assert file_sha256(damaged["path"]) != damaged["checksum"]
    re_verify_every_second(facility, damaged["location_id"])

    wait_for(
        lambda: repaired(facility, damaged["id"]),
        timeout=REPAIRED_WITHIN,
        what="the flipped byte to be found and repaired",
    )
    events = integrity_events(facility, damaged["id"])
    found = [e for e in events if e[1] == "mismatch"]
    assert len(found) == 1 and found[0][0] == "verified"
    assert found[0][2].startswith("worker:") and "checksum mismatch" in found[0][3]
    assert_repaired_from_a_good_copy(facility, damaged)


def test_an_archive_copy_removed_behind_the_systems_back_is_found_missing_and_rewritten(
    facility: Facility,
) -> None:
    facility.load_demo(scans=1)
    facility.start_beat("beat")
    facility.start_worker("worker", concurrency=2)
    wait_for(lambda: all_archived(facility), timeout=ARCHIVED_WITHIN, what="every package archived")

    lost = archive_copy(facility, "us")
    lost["path"].unlink()
    re_verify_every_second(facility, lost["location_id"])

    wait_for(
        lambda: repaired(facility, lost["id"]),
        timeout=REPAIRED_WITHIN,
        what="the removed copy to be found missing and rewritten",
    )
    events = integrity_events(facility, lost["id"])
    found = [e for e in events if e[1] == "missing"]
    assert len(found) == 1 and "not on storage" in found[0][3]
    assert_repaired_from_a_good_copy(facility, lost)
