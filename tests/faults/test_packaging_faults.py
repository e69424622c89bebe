"""Faults against the packaging path, with real worker and beat processes (see ``harness``).

Every test: leases of 6 s, manager ticks of 1 s, recovery every 2 s, at most ~180 s.
"""

from __future__ import annotations

import time
from pathlib import Path

from .harness import Facility, file_sha256, wait_for

MID_TAR = "packaging.mid_tar"
# Generous for two cores shared with the rest of the suite; the work itself takes seconds.
DONE_WITHIN = 120


def assert_built_once_and_intact(facility: Facility) -> None:
    """Every package completed exactly once, with one buffer copy whose bytes match its
    checksum, no partial tar anywhere, and nothing left claimed."""
    for package in facility.packages():
        assert package["status"] == "completed", package
        completed = [e for e in facility.events(package["id"]) if e[1] == "completed"]
        assert len(completed) == 1, facility.events(package["id"])
        assert facility.copies(package["id"]) == 1
        tar = Path(package["root"]) / package["relative_path"]
        assert file_sha256(tar) == package["checksum"]
    assert facility.partial_files_left() == []
    claimed = facility.sql(
        "SELECT count(*) FROM raw_data_package WHERE status IN ('scheduled', 'in_progress')"
    )
    assert claimed[0][0] == 0


def test_a_worker_killed_mid_tar_is_recovered_and_the_package_built_once(
    facility: Facility,
) -> None:
    facility.load_demo(scans=1, keep_copies=True)
    victim = facility.start_worker("victim", pause=MID_TAR)
    facility.start_beat("beat")

    marker = facility.reached(MID_TAR)
    assert marker["pid"] == victim.pid
    [(package_id,)] = facility.sql("SELECT id FROM raw_data_package WHERE status = 'in_progress'")
    facility.kill("victim")
    facility.start_worker("rescuer", concurrency=2)

    wait_for(facility.all_packaged, timeout=DONE_WITHIN, what="every package to be built")

    events = facility.events(package_id)
    recovered = [e for e in events if e[2] == "recovery"]
    assert recovered and recovered[0][:2] == ("in_progress", "pending"), events
    assert "expired" in recovered[0][3]
    [package] = [p for p in facility.packages() if p["id"] == package_id]
    assert package["retry_count"] == 1
    assert_built_once_and_intact(facility)


def test_two_beats_at_once_do_nothing_twice(facility: Facility) -> None:
    facility.load_demo(scans=2, keep_copies=True)
    facility.start_beat("beat-a")
    facility.start_beat("beat-b")
    facility.start_worker("worker", concurrency=2)

    wait_for(facility.all_packaged, timeout=DONE_WITHIN, what="every package to be built")
    # Let both beats tick a few more times over a finished facility.
    time.sleep(3)

    for package in facility.packages():
        events = facility.events(package["id"])
        assert [e[1] for e in events] == ["pending", "scheduled", "in_progress", "completed"]
    # Each file is in exactly one package, and no package was planned empty or twice.
    [(files, packaged, empty)] = facility.sql(
        "SELECT (SELECT count(*) FROM raw_data_file), "
        "(SELECT count(*) FROM raw_data_file WHERE raw_data_package_id IS NOT NULL), "
        "(SELECT count(*) FROM raw_data_package p WHERE NOT EXISTS "
        " (SELECT 1 FROM raw_data_file f WHERE f.raw_data_package_id = p.id))"
    )
    assert files == packaged and empty == 0
    assert_built_once_and_intact(facility)
    both = facility.log("beat-a") + facility.log("beat-b")
    assert both.count("run_packaging_manager") >= 2


def test_work_resumes_after_the_broker_restarts_and_loses_its_queue(facility: Facility) -> None:
    facility.load_demo(scans=2, keep_copies=True)
    facility.start_worker("worker", pause=MID_TAR)
    facility.start_beat("beat")
    facility.reached(MID_TAR)
    waiting = facility.sql("SELECT id FROM raw_data_package WHERE status = 'scheduled'")
    assert waiting, "the other packages should be claimed and queued behind the paused one"

    # The broker dies with the queued tasks (no persistence) and comes back empty.
    facility.redis.kill()
    facility.redis.start()
    facility.release(MID_TAR)

    wait_for(facility.all_packaged, timeout=DONE_WITHIN, what="every package to be built")

    # Tasks lost with the queue were claims that never started: handed back at no cost.
    free = [
        e
        for (package_id,) in waiting
        for e in facility.events(package_id)
        if e[2] == "recovery" and "never started" in e[3]
    ]
    assert free, "recovery should have handed back the claims whose tasks were lost"
    for package in facility.packages():
        if (package["id"],) in waiting:
            assert package["retry_count"] == 0
    assert_built_once_and_intact(facility)


def test_a_full_buffer_fails_clearly_after_retries_and_loses_nothing(facility: Facility) -> None:
    facility.load_demo(scans=1, keep_copies=True)
    sources = {
        row[0]: row[1:]
        for row in facility.sql(
            "SELECT f.id, l.root_path, f.relative_path, f.checksum FROM raw_data_file f "
            "JOIN data_location l ON l.id = f.source_location_id"
        )
    }
    # Each tar is larger than this, so every attempt hits "File too large" (EFBIG).
    facility.start_worker("cramped", file_size_limit=100_000)
    facility.start_beat("beat")

    def all_failed() -> bool:
        packages = facility.packages()
        return bool(packages) and all(p["status"] == "failed" for p in packages)

    wait_for(all_failed, timeout=DONE_WITHIN, what="the packages to fail after their retries")

    for package in facility.packages():
        assert package["state"] == "failed"
        assert package["retry_count"] == 3
        assert (
            "File too large" in package["error"] and "gave up after 3 retries" in package["error"]
        )
        starts = [e for e in facility.events(package["id"]) if e[1] == "in_progress"]
        assert len(starts) == 4
        assert facility.copies(package["id"]) == 0
    assert facility.partial_files_left() == []
    # Nothing lost: every raw file is intact where it was, still assigned to its package.
    for root, relative, checksum in sources.values():
        assert file_sha256(Path(root) / relative) == checksum
    assert (
        facility.sql("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id IS NULL")[0][0]
        == 0
    )

    # The operator frees space and resets the packages; a worker with room builds them.
    facility.kill("cramped")
    facility.python(
        "from pipelines.models import RawDataPackage\n"
        "from pipelines.services.operations import operation_reset\n"
        "from pipelines.services.states import transition\n"
        "for p in RawDataPackage.objects.all():\n"
        "    operation_reset(p, actor='operator', reason='buffer cleaned')\n"
        "    transition(p, 'waiting', field='state', actor='operator', reason='buffer cleaned')\n"
    )
    facility.start_worker("roomy")
    wait_for(facility.all_packaged, timeout=DONE_WITHIN, what="the reset packages to be built")
    assert_built_once_and_intact(facility)


def test_the_heartbeat_of_a_killed_worker_expires(facility: Facility) -> None:
    facility.load_demo(scans=0, keep_copies=True)
    facility.start_worker("doomed")
    cache = facility.redis.client(1)
    key = "health:worker:doomed@localhost"

    wait_for(lambda: cache.get(key) == b"alive", timeout=60, what="the worker's heartbeat")
    # Kept alive past its 3 s time to live while the worker runs.
    for _ in range(5):
        time.sleep(1)
        assert cache.get(key) == b"alive"
        assert 0 < cache.ttl(key) <= 3

    facility.kill("doomed")
    wait_for(lambda: cache.get(key) is None, timeout=10, what="the heartbeat to expire")
