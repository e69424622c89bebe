"""Deletion with real worker and beat processes (see ``harness``): two beats (two deletion
managers) at once, and a deletion worker killed with SIGKILL in the middle of a delete. The demo
facility keeps nothing at the observatory once a package is archived, so the whole data path
runs and then the observatory's SOURCE and BUFFER are emptied."""

from __future__ import annotations

from pathlib import Path

from .harness import Facility, all_archived, wait_for

DONE_WITHIN = 150


def observatory_freed(facility: Facility) -> bool:
    """Every package archived twice, and every copy at the observatory deleted."""
    if not all_archived(facility):
        return False
    left = facility.sql(
        "SELECT count(*) FROM physical_copy c JOIN data_location l ON l.id = c.location_id "
        "JOIN site s ON s.id = l.site_id WHERE s.short_name = 'ccat' AND c.status <> 'deleted'"
    )
    return left[0][0] == 0


def assert_deletions_sound(facility: Facility) -> None:
    """Each deleted copy went scheduled -> in progress -> deleted with its reason, had one
    completed deletion task, its file is gone; nothing is left mid-deletion; every package
    still has its two verified archive copies."""
    stuck = facility.sql(
        "SELECT id, status FROM physical_copy "
        "WHERE status IN ('deletion_scheduled', 'deletion_in_progress')"
    )
    assert stuck == []
    deleted = facility.sql(
        "SELECT c.id, c.deletion_reason, l.root_path, c.relative_path FROM physical_copy c "
        "JOIN data_location l ON l.id = c.location_id WHERE c.status = 'deleted'"
    )
    assert deleted, "nothing was deleted"
    for copy_id, reason, root, relative_path in deleted:
        path = [
            row[0]
            for row in facility.sql(
                "SELECT to_state FROM state_event WHERE entity = 'physical_copy' "
                "AND object_id = %s AND field = 'status' ORDER BY id",
                (str(copy_id),),
            )
        ]
        assert path[-3:] == ["deletion_scheduled", "deletion_in_progress", "deleted"], path
        assert reason and "archived" in reason
        assert not (Path(root) / relative_path).exists()
        tasks = facility.sql(
            "SELECT status FROM deletion_task WHERE physical_copy_id = %s", (copy_id,)
        )
        assert [t[0] for t in tasks].count("completed") == 1, tasks
    per_package = facility.sql(
        "SELECT p.id, count(c.id) FROM raw_data_package p LEFT JOIN physical_copy c "
        "ON c.raw_data_package_id = p.id AND c.status = 'present' AND c.integrity = 'verified' "
        "AND c.location_id IN (SELECT id FROM data_location "
        "WHERE location_type = 'long_term_archive') GROUP BY p.id"
    )
    assert per_package and all(n == 2 for _id, n in per_package)


def test_two_deletion_managers_at_once_delete_each_copy_once(facility: Facility) -> None:
    facility.load_demo(scans=2)
    facility.start_beat("beat-a")
    facility.start_beat("beat-b")
    facility.start_worker("worker", concurrency=2)

    wait_for(
        lambda: observatory_freed(facility),
        timeout=DONE_WITHIN,
        what="every package archived and the observatory emptied",
    )
    assert_deletions_sound(facility)
    # Both managers ticked; neither scheduled a copy the other had.
    managers = facility.sql(
        "SELECT DISTINCT actor FROM state_event WHERE entity = 'physical_copy' "
        "AND to_state = 'deletion_scheduled'"
    )
    assert managers
    duplicates = facility.sql(
        "SELECT physical_copy_id FROM deletion_task GROUP BY 1 HAVING count(*) > 1"
    )
    assert duplicates == []


def test_a_deletion_worker_killed_mid_delete_is_recovered_and_nothing_stays_in_progress(
    facility: Facility,
) -> None:
    facility.load_demo(scans=1)
    victim = facility.start_worker("victim", pause="deletion.mid_delete")
    facility.start_beat("beat")

    assert facility.reached("deletion.mid_delete", timeout=120)["pid"] == victim.pid
    [(task_id, copy_id)] = facility.sql(
        "SELECT id, physical_copy_id FROM deletion_task WHERE status = 'in_progress'"
    )
    assert facility.sql("SELECT status FROM physical_copy WHERE id = %s", (copy_id,)) == [
        ("deletion_in_progress",)
    ]
    facility.kill("victim")
    facility.start_worker("rescuer", concurrency=2)

    wait_for(
        lambda: observatory_freed(facility),
        timeout=DONE_WITHIN,
        what="every package archived and the observatory emptied",
    )
    events = facility.sql(
        "SELECT from_state, to_state, actor FROM state_event WHERE entity = 'deletion_task' "
        "AND object_id = %s AND field = 'status' ORDER BY id",
        (str(task_id),),
    )
    assert ("in_progress", "pending", "recovery") in events
    assert [e[1] for e in events].count("completed") == 1
    copy_path = [
        row[0]
        for row in facility.sql(
            "SELECT to_state FROM state_event WHERE entity = 'physical_copy' "
            "AND object_id = %s AND field = 'status' ORDER BY id",
            (str(copy_id),),
        )
    ]
    # The rescuer finished the decision the victim had taken: no second schedule.
    assert copy_path[-3:] == ["deletion_scheduled", "deletion_in_progress", "deleted"]
    assert copy_path.count("deletion_in_progress") == 1
    assert_deletions_sound(facility)
