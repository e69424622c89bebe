"""Deletion with real worker and beat processes (see ``harness``): two beats (two deletion
managers) at once, and a deletion worker killed with SIGKILL in the middle of a delete. The demo
facility keeps nothing at the observatory once a package is archived, so the whole data path
runs and then the observatory's SOURCE and BUFFER are emptied."""

from __future__ import annotations

from itertools import pairwise
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
        # One task deleted it; any other was withdrawn (the demo's reduction runs hold their
        # input packages for a while, and a copy scheduled just before is withdrawn).
        tasks = facility.sql(
            "SELECT status, idempotency_key FROM deletion_task WHERE physical_copy_id = %s",
            (copy_id,),
        )
        outcomes = sorted(key.rsplit(":", 1)[-1] for status, key in tasks if status == "completed")
        assert outcomes.count("deleted") == 1, tasks
        assert set(outcomes) <= {"deleted", "withdrawn"}, tasks
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
    # Each scheduling by a manager made exactly one task: two managers never both scheduled a
    # copy (a copy scheduled again after a withdrawal has a new task, and a new event).
    mismatched = facility.sql(
        "SELECT c.id, (SELECT count(*) FROM deletion_task t WHERE t.physical_copy_id = c.id), "
        "(SELECT count(*) FROM state_event e WHERE e.entity = 'physical_copy' "
        "AND e.object_id = c.id::text AND e.to_state = 'deletion_scheduled' "
        "AND e.actor LIKE 'manager:%%') FROM physical_copy c"
    )
    assert [row for row in mismatched if row[1] != row[2]] == []


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
    copy_events = facility.sql(
        "SELECT to_state, reason FROM state_event WHERE entity = 'physical_copy' "
        "AND object_id = %s AND field = 'status' ORDER BY id",
        (str(copy_id),),
    )
    copy_path = [row[0] for row in copy_events]
    # The rescuer took the victim's decision to its last look under the lock: it either removed
    # the file, or (when something came to need the copy meanwhile, e.g. a run that takes the
    # package as input) stopped before removing it, and a later deletion finished the job.
    assert copy_path[-3:] == ["deletion_scheduled", "deletion_in_progress", "deleted"]
    for (state, _), (after, reason) in pairwise(copy_events):
        if state == "deletion_in_progress":
            assert after == "deleted" or (
                after == "deletion_failed"
                and reason.startswith("deletion stopped before removing the file")
            ), copy_events
    assert_deletions_sound(facility)


def test_a_deletion_racing_an_integrity_failure_of_the_archive_copies_is_withdrawn(
    facility: Facility,
) -> None:
    """A deletion worker stopped just before it locks and re-judges its copy; meanwhile every
    archive copy of the package is found damaged (through the integrity service, which takes
    the same package-row lock). Released, the worker sees the damage and withdraws: the last
    good copy at the observatory survives."""
    facility.load_demo(scans=1)
    victim = facility.start_worker("victim", pause="deletion.before_decision")
    facility.start_beat("beat")

    assert facility.reached("deletion.before_decision", timeout=120)["pid"] == victim.pid
    [(task_id, copy_id, root, relative_path)] = facility.sql(
        "SELECT t.id, c.id, l.root_path, c.relative_path FROM deletion_task t "
        "JOIN physical_copy c ON c.id = t.physical_copy_id "
        "JOIN data_location l ON l.id = c.location_id WHERE t.status = 'in_progress'"
    )
    # Every archive copy in the facility (one scan: a few packages) is found damaged, whatever
    # kind of copy the worker holds (a source file, a package tar or a bundle tar).
    marked = facility.python(
        "from pipelines.models import PhysicalCopy\n"
        "from pipelines.services.integrity import copy_mark_damaged\n"
        "print(sum(copy_mark_damaged(copy, 'mismatch', actor='test', reason='damaged')\n"
        "          for copy in PhysicalCopy.objects.filter(\n"
        "              location__location_type='long_term_archive', integrity='verified')))\n"
    )
    assert int(marked.strip()) > 0
    facility.release("deletion.before_decision")

    def settled() -> bool:
        return facility.sql("SELECT status FROM deletion_task WHERE id = %s", (task_id,)) == [
            ("completed",)
        ]

    wait_for(settled, timeout=60, what="the deletion task to settle")
    events = facility.sql(
        "SELECT to_state, reason FROM state_event WHERE entity = 'physical_copy' "
        "AND object_id = %s AND field = 'status' ORDER BY id",
        (str(copy_id),),
    )
    assert events[-1][0] == "present"
    assert events[-1][1].startswith("deletion withdrawn: only 0 of 1 required verified archive")
    assert "deletion_in_progress" not in [e[0] for e in events]
    assert (Path(root) / relative_path).exists()
