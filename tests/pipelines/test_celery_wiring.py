"""Celery wiring: queue names and discovery, the router, the operation task base class, lease
recovery, and a real round trip through a broker with a worker.

Task functions and methods are called directly; nothing here uses eager mode. The round trips
start a real worker in a background thread against the embedded file-system broker (always)
and against Redis (when it is running; required under ``REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import TestWorkController
from celery.worker import state as worker_state
from django.core.management import call_command

from pipelines import queues
from pipelines.models import (
    DataLocation,
)
from tests import factories as f
from tests.conftest import require_service
from workflow_site.celery import app as project_app

LT = DataLocation.LocationType


# --- queue names and discovery -------------------------------------------------------------------
@pytest.fixture
def cologne(db: None) -> Any:
    return f.SiteFactory(short_name="cologne", name="Cologne")


def test_queue_name_is_site_location_operation(cologne: Any) -> None:
    buffer = f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    assert queues.queue_name(buffer, queues.OperationType.DELETION) == "cologne_buffer_deletion"
    assert queues.queue_name(buffer, "data_transfer") == "cologne_buffer_data_transfer"


@pytest.mark.parametrize(
    ("location_type", "operation"),
    [
        (LT.BUFFER, "staging"),
        (LT.LONG_TERM_ARCHIVE, "staging"),
        (LT.SOURCE, "long_term_archive_transfer"),
        (LT.PROCESSING, "raw_data_package_creation"),
    ],
)
def test_queue_name_rejects_an_operation_the_location_type_does_not_do(
    cologne: Any, location_type: str, operation: str
) -> None:
    location = f.DataLocationFactory(site=cologne, name="here", location_type=location_type)
    with pytest.raises(ValueError, match=f"operation '{operation}' is not performed"):
        queues.queue_name(location, operation)


def test_queue_name_rejects_an_unknown_operation(cologne: Any) -> None:
    location = f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    with pytest.raises(ValueError, match="valid: "):
        queues.queue_name(location, "teleport")


def test_every_location_type_has_deletion_and_integrity_queues() -> None:
    for location_type in LT.values:
        operations = queues.VALID_OPERATIONS[location_type]
        assert queues.OperationType.DELETION in operations
        assert queues.OperationType.INTEGRITY_CHECK in operations


def test_a_new_location_adds_its_queues_without_code_changes(cologne: Any) -> None:
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    before = set(queues.discover_queues())
    assert "cologne_buffer_deletion" in before
    assert not any(name.startswith("cologne_archive_") for name in before)

    f.DataLocationFactory(site=cologne, name="archive", location_type=LT.LONG_TERM_ARCHIVE)

    added = set(queues.discover_queues()) - before
    assert added == {
        "cologne_archive_long_term_archive_transfer",
        "cologne_archive_data_transfer",
        "cologne_archive_data_transfer_unpacking",
        "cologne_archive_deletion",
        "cologne_archive_integrity_check",
    }


def test_inactive_locations_have_no_queues(cologne: Any) -> None:
    f.DataLocationFactory(site=cologne, name="old_buffer", location_type=LT.BUFFER, active=False)
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    names = queues.discover_queues()
    assert "cologne_buffer_deletion" in names
    assert not any("old_buffer" in name for name in names)


def test_discovery_by_site_and_by_location(cologne: Any) -> None:
    buffer = f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    processing = f.DataLocationFactory(site=cologne, name="cluster", location_type=LT.PROCESSING)
    chile = f.SiteFactory(short_name="chile")
    f.DataLocationFactory(site=chile, name="source", location_type=LT.SOURCE)

    cologne_queues = queues.discover_queues(site="cologne")
    assert cologne_queues == sorted(cologne_queues)
    assert all(name.startswith("cologne_") for name in cologne_queues)
    assert "cologne_cluster_staging" in cologne_queues
    assert "chile_source_raw_data_package_creation" in queues.discover_queues(site="chile")

    only_processing = queues.discover_queues(location_ids=[processing.pk])
    assert only_processing == [
        "cologne_cluster_deletion",
        "cologne_cluster_integrity_check",
        "cologne_cluster_staging",
    ]
    assert not any(name.startswith("cologne_buffer_") for name in only_processing)
    assert "cologne_buffer_deletion" in queues.discover_queues(location_ids=[buffer.pk])


def test_workflow_queues_are_listed_only_when_asked(cologne: Any) -> None:
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    assert not set(queues.WORKFLOW_QUEUES) & set(queues.discover_queues())
    with_workflow = queues.discover_queues(include_workflow=True)
    assert {"workflow.staging", "workflow.hpc", "workflow.results"} <= set(with_workflow)
    assert "cologne_buffer_deletion" in with_workflow


def test_queues_command_prints_a_comma_separated_list_for_dash_q(cologne: Any) -> None:
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    f.DataLocationFactory(
        site=f.SiteFactory(short_name="chile"), name="source", location_type=LT.SOURCE
    )

    out = StringIO()
    call_command("queues", "--site", "cologne", "--workflow", "--managers", stdout=out)

    names = out.getvalue().strip().split(",")
    assert names == sorted(
        {*queues.discover_queues(site="cologne", include_workflow=True)}
        | {"workflow.managers", "workflow.default"}
    )
    assert "cologne_buffer_deletion" in names
    assert "workflow.hpc" in names
    assert not any(name.startswith("chile_") for name in names)


def test_queues_command_without_a_selection_lists_every_active_location(cologne: Any) -> None:
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    f.DataLocationFactory(
        site=f.SiteFactory(short_name="chile"), name="source", location_type=LT.SOURCE
    )
    out = StringIO()
    call_command("queues", stdout=out)
    assert out.getvalue().strip().split(",") == queues.discover_queues()


def test_queues_command_for_a_worker_that_serves_only_the_fixed_queues(cologne: Any) -> None:
    f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    out = StringIO()
    call_command("queues", "--no-locations", "--managers", stdout=out)
    assert out.getvalue().strip() == "workflow.default,workflow.managers"
    out = StringIO()
    call_command("queues", "--no-locations", "--workflow", stdout=out)
    assert out.getvalue().strip() == "workflow.hpc,workflow.results,workflow.staging"


def test_queues_command_fails_clearly_when_nothing_matches(db: None) -> None:
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="no active location"):
        call_command("queues", "--site", "atlantis", stdout=StringIO())
    with pytest.raises(CommandError, match="contradicts"):
        call_command("queues", "--no-locations", "--site", "cologne", stdout=StringIO())


# --- the router ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task_name", "queue"),
    [
        ("pipelines.tasks.run_packaging_manager", "workflow.managers"),
        ("pipelines.tasks.run_archive_manager", "workflow.managers"),
        ("pipelines.tasks.recover_expired_leases", "workflow.managers"),
        ("pipelines.tasks.build_raw_data_package", "workflow.default"),
        ("somewhere.else", "workflow.default"),
    ],
)
def test_route_task_sends_tasks_to_their_queue(task_name: str, queue: str) -> None:
    assert queues.route_task(task_name, (), {}, {}) == {"queue": queue}


def test_every_fixed_route_names_a_registered_task() -> None:
    project_app.loader.import_default_modules()
    for name in queues.TASK_ROUTES:
        assert name in project_app.tasks, f"TASK_ROUTES routes {name}, which is not a task"


def test_an_explicit_queue_wins_over_the_route_table() -> None:
    explicit = {"queue": "cologne_buffer_deletion"}
    assert queues.route_task("pipelines.tasks.submit_run", (1,), {}, explicit) is None


def test_the_project_app_uses_the_router() -> None:
    router = project_app.amqp.router
    route = router.route({}, "pipelines.tasks.recover_expired_leases", (), {})
    assert route["queue"].name == "workflow.managers"
    route = router.route({}, "pipelines.tasks.run_deletion_manager", (), {})
    assert route["queue"].name == "workflow.managers"
    route = router.route({"queue": "cologne_buffer_deletion"}, "pipelines.tasks.submit_run", (), {})
    assert route["queue"].name == "cologne_buffer_deletion"


def test_the_project_app_speaks_json_and_acknowledges_late() -> None:
    conf = project_app.conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.task_track_started is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_default_queue == "workflow.default"


def test_the_lease_reconciler_is_scheduled_and_registered() -> None:
    entry = project_app.conf.beat_schedule["recover-expired-leases"]
    assert entry["task"] == "pipelines.tasks.recover_expired_leases"
    assert entry["task"] in project_app.tasks


# --- a real round trip through a broker ----------------------------------------------------------
WORKER_START_TIMEOUT = 30.0
TASK_TIMEOUT = 30.0
WORKER_THREAD_NAME = "celery-test-worker"


def _make_test_app(broker_url: str, transport_options: dict[str, Any]) -> Celery:
    """A Celery app with the project's task settings and router but its own broker.

    No Django fixups: the worker thread must not close or reconfigure the test's database
    connection; the task writes a file, which the test reads.
    """
    app = Celery(f"wiring-test-{uuid.uuid4().hex[:8]}", set_as_current=False, fixups=[])
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=1,
        result_backend=None,
        task_serializer=project_app.conf.task_serializer,
        accept_content=list(project_app.conf.accept_content),
        task_acks_late=project_app.conf.task_acks_late,
        task_reject_on_worker_lost=project_app.conf.task_reject_on_worker_lost,
        task_default_queue=project_app.conf.task_default_queue,
        task_routes=project_app.conf.task_routes,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name="tests.wiring.write_marker", bind=True, ignore_result=True, shared=False)
    def write_marker(self: Any, path: str, value: str) -> None:
        # Written atomically so the polling test never reads half a file.
        target = Path(path)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "value": value,
                    "routing_key": (self.request.delivery_info or {}).get("routing_key"),
                    "thread": threading.current_thread().name,
                }
            )
        )
        os.replace(tmp, target)

    return app


@contextmanager
def _running_worker(app: Celery, queue_names: list[str]) -> Iterator[TestWorkController]:
    """A solo-pool worker in a daemon thread, stopped (bounded) when the block ends."""
    app.finalize()
    created: dict[str, Any] = {}
    ready = threading.Event()
    hostname = f"wiring-{uuid.uuid4().hex[:8]}@localhost"

    def run() -> None:
        try:
            # The solo pool looks tasks up in the *current* app, which is thread-local: making
            # the test app current here leaves the rest of the test session untouched.
            app.set_current()
            worker = TestWorkController(
                app=app,
                hostname=hostname,
                concurrency=1,
                pool="solo",
                loglevel="WARNING",
                logfile=None,
                ready_callback=None,
                without_heartbeat=True,
                without_mingle=True,
                without_gossip=True,
                queues=queue_names,
            )
            created["worker"] = worker
        except BaseException as exc:  # surfaced to the test below
            created["error"] = exc
            return
        finally:
            ready.set()
        worker.start()

    thread = threading.Thread(target=run, name=WORKER_THREAD_NAME, daemon=True)
    thread.start()
    ready.wait(WORKER_START_TIMEOUT)
    if "error" in created:
        raise created["error"]
    worker = created.get("worker")
    assert worker is not None, "worker was not created in time"
    try:
        if not worker._on_started.wait(WORKER_START_TIMEOUT):
            pytest.fail(f"worker did not connect to {app.conf.broker_url} within the timeout")
        yield worker
    finally:
        worker_state.should_terminate = 0
        thread.join(20)
        worker_state.should_terminate = None
        assert not thread.is_alive(), "worker thread did not stop within 20 s"


def _wait_for_file(path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + TASK_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists():
            loaded: dict[str, Any] = json.loads(path.read_text())
            return loaded
        time.sleep(0.05)
    pytest.fail(f"the worker did not run the task within {TASK_TIMEOUT}s")


def _round_trip(app: Celery, tmp_path: Path, location_queue: str) -> None:
    """Send one task to a per-location queue and one through the router's default route; a
    worker serving exactly those queues runs both."""
    explicit = tmp_path / "explicit.json"
    routed = tmp_path / "routed.json"
    task = app.tasks["tests.wiring.write_marker"]
    with _running_worker(app, [location_queue, queues.DEFAULT_QUEUE]) as worker:
        task.apply_async((str(explicit), "to the location queue"), queue=location_queue)
        task.delay(str(routed), "through the router")
        first = _wait_for_file(explicit)
        second = _wait_for_file(routed)
    assert first["value"] == "to the location queue"
    assert first["routing_key"] == location_queue
    # Run by the worker, not in the sending (test) thread.
    assert first["thread"] == second["thread"] == WORKER_THREAD_NAME
    assert worker.hostname.startswith("wiring-")
    assert second["value"] == "through the router"
    assert second["routing_key"] == queues.DEFAULT_QUEUE


def test_round_trip_through_the_embedded_filesystem_broker(cologne: Any, tmp_path: Path) -> None:
    location = f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    location_queue = queues.queue_name(location, queues.OperationType.DELETION)
    assert location_queue in queues.discover_queues()
    folder = tmp_path / "broker"
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True)
    app = _make_test_app(
        "filesystem://",
        {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        },
    )

    _round_trip(app, tmp_path, location_queue)

    # Acknowledged messages are removed from the queue folder.
    assert list((folder / "queue").glob("*.msg")) == []


def _redis_url() -> str:
    configured = os.environ.get("CELERY_BROKER_URL", "")
    return configured if configured.startswith("redis://") else "redis://127.0.0.1:6379/0"


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def test_round_trip_through_redis(cologne: Any, tmp_path: Path) -> None:
    url = _redis_url()
    require_service(_redis_answers(url), f"needs Redis at {url} (set CELERY_BROKER_URL)")
    location = f.DataLocationFactory(site=cologne, name="buffer", location_type=LT.BUFFER)
    # A run-unique location queue, so parallel runs against one Redis never share messages.
    location_queue = queues.queue_name(location, queues.OperationType.DELETION)
    # A run-unique key prefix, so parallel runs (or real workers) on one Redis never share keys.
    prefix = f"wiring-test-{uuid.uuid4().hex[:12]}:"
    app = _make_test_app(url, {"visibility_timeout": 60, "global_keyprefix": prefix})
    try:
        _round_trip(app, tmp_path, location_queue)
    finally:
        import redis

        client = redis.Redis.from_url(url)
        leftover = list(client.scan_iter(match=f"{prefix}*"))
        if leftover:
            client.delete(*leftover)
