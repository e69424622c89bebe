"""Faults on the way to the archives, with real worker and beat processes (see ``harness``):
a worker killed mid-copy and mid-unpack, and two beats at once over the whole path."""

from __future__ import annotations

import hashlib

from tests.pipelines.test_storage_contract import moto_endpoint, new_bucket, raw_s3_client

from .harness import Facility, all_archived, wait_for

__all__ = ["moto_endpoint"]  # a fixture, used by name

DONE_WITHIN = 150


def assert_each_copy_once_and_nothing_partial(facility: Facility) -> None:
    duplicates = facility.sql(
        "SELECT kind, coalesce(raw_data_file_id::text, raw_data_package_id::text, "
        "data_transfer_package_id::text, data_product_id::text), location_id, "
        "count(*) FROM physical_copy WHERE status <> 'deleted' GROUP BY 1, 2, 3 HAVING count(*) > 1"
    )
    assert duplicates == []
    assert facility.partial_files_left() == []
    failed = facility.sql(
        "SELECT (SELECT count(*) FROM data_transfer WHERE status = 'failed' "
        "        OR unpack_status = 'failed') "
        "     + (SELECT count(*) FROM long_term_archive_transfer WHERE status = 'failed')"
    )
    assert failed[0][0] == 0


def test_a_worker_killed_mid_copy_is_recovered_and_the_bundle_arrives_once(
    facility: Facility,
) -> None:
    facility.load_demo(scans=1)
    victim = facility.start_worker("victim", pause="transfer.after_copy")
    facility.start_beat("beat")

    assert facility.reached("transfer.after_copy", timeout=90)["pid"] == victim.pid
    [(transfer_id,)] = facility.sql("SELECT id FROM data_transfer WHERE status = 'in_progress'")
    facility.kill("victim")
    facility.start_worker("rescuer", concurrency=2)

    wait_for(lambda: all_archived(facility), timeout=DONE_WITHIN, what="every package archived")

    events = facility.sql(
        "SELECT from_state, to_state, actor FROM state_event WHERE entity = 'data_transfer' "
        "AND object_id = %s AND field = 'status' ORDER BY id",
        (str(transfer_id),),
    )
    assert ("in_progress", "pending", "recovery") in events
    assert len([e for e in events if e[1] == "completed"]) == 1
    assert facility.sql("SELECT retry_count FROM data_transfer WHERE id = %s", (transfer_id,)) == [
        (1,)
    ]
    assert_each_copy_once_and_nothing_partial(facility)


def test_a_worker_killed_mid_unpack_is_recovered_and_each_package_registered_once(
    facility: Facility,
) -> None:
    facility.load_demo(scans=1)
    victim = facility.start_worker("victim", pause="unpack.mid_bundle")
    facility.start_beat("beat")

    assert facility.reached("unpack.mid_bundle", timeout=90)["pid"] == victim.pid
    [(transfer_id,)] = facility.sql(
        "SELECT id FROM data_transfer WHERE unpack_status = 'in_progress'"
    )
    facility.kill("victim")
    facility.start_worker("rescuer", concurrency=2)

    wait_for(lambda: all_archived(facility), timeout=DONE_WITHIN, what="every package archived")

    events = facility.sql(
        "SELECT from_state, to_state, actor FROM state_event WHERE entity = 'data_transfer' "
        "AND object_id = %s AND field = 'unpack_status' ORDER BY id",
        (str(transfer_id),),
    )
    assert ("in_progress", "pending", "recovery") in events
    assert len([e for e in events if e[1] == "completed"]) == 1
    [(status, unpack_retries, copy_retries)] = facility.sql(
        "SELECT status, unpack_retry_count, retry_count FROM data_transfer WHERE id = %s",
        (transfer_id,),
    )
    # The copy was not repeated: only the unpacking was retried.
    assert (status, unpack_retries, copy_retries) == ("completed", 1, 0)
    assert_each_copy_once_and_nothing_partial(facility)


def test_two_beats_at_once_keep_the_round_robin_and_make_no_duplicate_transfer(
    facility: Facility,
) -> None:
    facility.load_demo(scans=3)
    facility.start_beat("beat-a")
    facility.start_beat("beat-b")
    facility.start_worker("worker", concurrency=2)

    wait_for(lambda: all_archived(facility), timeout=DONE_WITHIN, what="every package archived")

    primaries = facility.sql(
        "SELECT s.short_name FROM data_transfer t JOIN data_location l "
        "ON l.id = t.destination_location_id JOIN site s ON s.id = l.site_id "
        "WHERE t.is_primary ORDER BY t.id"
    )
    sites = [row[0] for row in primaries]
    assert sites == (["cologne", "us"] * len(sites))[: len(sites)]
    per_bundle = facility.sql(
        "SELECT data_transfer_package_id, count(*) FILTER (WHERE is_primary), count(*) "
        "FROM data_transfer GROUP BY 1"
    )
    assert all(primary == 1 and total == 2 for _bundle, primary, total in per_bundle)
    assert_each_copy_once_and_nothing_partial(facility)


def test_every_package_reaches_an_s3_archive_too_with_real_processes(
    facility: Facility, moto_endpoint: str
) -> None:
    bucket = new_bucket(moto_endpoint)
    facility.load_demo(scans=1)
    facility.sql_write(
        "UPDATE data_location SET storage_type = 's3', root_path = '', s3_endpoint_url = %s, "
        "s3_bucket = %s, s3_region = 'us-east-1', s3_prefix = 'ccat' WHERE id = ("
        "SELECT l.id FROM data_location l JOIN site s ON s.id = l.site_id "
        "WHERE s.short_name = 'us' AND l.name = 'lta')",
        (moto_endpoint, bucket),
    )
    facility.env["WORKFLOW_S3_US_LTA_ACCESS_KEY_ID"] = "AKIAFAULTTEST"
    facility.env["WORKFLOW_S3_US_LTA_SECRET_ACCESS_KEY"] = "fault-test-secret"
    facility.start_beat("beat")
    facility.start_worker("worker", concurrency=2)

    wait_for(lambda: all_archived(facility), timeout=DONE_WITHIN, what="every package archived")

    client = raw_s3_client(moto_endpoint)
    for name, relative_path, checksum in facility.sql(
        "SELECT name, relative_path, checksum FROM raw_data_package"
    ):
        body = client.get_object(Bucket=bucket, Key=f"ccat/{relative_path}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == checksum, name
    assert_each_copy_once_and_nothing_partial(facility)
