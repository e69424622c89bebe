"""The local job wrapper's completion push on a Redis broker (pipelines/backends/local_job.py):
the message it LPUSHes over a plain socket must be the one kombu's Redis transport would store,
a real Celery worker must run it, AUTH and SELECT come from the URL, and a broker that does not
answer costs the job nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.backends import local_job
from pipelines.backends.base import JOB_DONE_CALLBACK_ENV, JobSpec
from pipelines.backends.local import LocalBackend
from tests.conftest import require_service

REDIS_URL = "redis://127.0.0.1:6379/12"
TASK = "pipelines.tasks.run_job_finished"
QUEUE = "workflow.results"


def _redis_answers() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_db() -> Iterator[Any]:
    """Redis DB 12, empty before and after the test."""
    require_service(_redis_answers(), "needs Redis on 127.0.0.1:6379")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


def _callback(args: list[int], url: str = REDIS_URL, **options: Any) -> str:
    callback = {"broker_url": url, "transport_options": options, "task": TASK, "args": args}
    return json.dumps({**callback, "queue": QUEUE})


# --- URL parsing and RESP, no service needed ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/12", ("127.0.0.1", 6379, None, None, 12)),
        ("redis://broker", ("broker", 6379, None, None, 0)),
        ("redis://broker:6380", ("broker", 6380, None, None, 0)),
        ("redis://:s3cret@broker:6380/3", ("broker", 6380, None, "s3cret", 3)),
        ("redis://ops:p%40ss%3Aword@broker/1", ("broker", 6379, "ops", "p@ss:word", 1)),
        ("redis://:a@b@broker/2?socket_timeout=5", ("broker", 6379, None, "a@b", 2)),
        ("redis://[::1]:7000/4", ("::1", 7000, None, None, 4)),
        ("redis:///5", ("localhost", 6379, None, None, 5)),
    ],
)
def test_it_reads_host_port_credentials_and_db_from_a_redis_url(
    url: str, expected: tuple[Any, ...]
) -> None:
    assert local_job.parse_redis_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@rabbit//",
        "rediss://broker:6380/0",
        "filesystem://",
        "redis://user@broker/0",
        "redis://broker:notaport/0",
        "redis://broker/notadb",
        "redis://broker:0/1",
    ],
)
def test_it_leaves_other_brokers_and_unusual_redis_urls_to_kombu(url: str) -> None:
    with pytest.raises(ValueError):
        local_job.parse_redis_url(url)


@pytest.mark.parametrize(
    "document",
    [
        _callback([12], "redis://:p%40ss@broker:6380/3", visibility_timeout=43200),
        '{"a": [1, -2, 3.5, 1e3, true, false, null, [], {}], "b": "\\u00e9\\ud83d\\ude00\\"\\n"}',
        ' \n[ "x" , { "k" : { "n" : -0.25E-2 } } ] ',
        "42",
        '""',
    ],
)
def test_it_reads_json_as_the_json_module_does(document: str) -> None:
    assert local_job.from_json(document) == json.loads(document)


@pytest.mark.parametrize(
    "document",
    ["", "{not json", '{"a" 1}', '{"a": 1,}', "[1 2]", '{"a": 1} x', "[1,", "tru", '"open', "-"],
)
def test_it_refuses_malformed_json(document: str) -> None:
    with pytest.raises(ValueError):
        local_job.from_json(document)


def test_it_encodes_commands_as_resp_arrays_of_bulk_strings() -> None:
    assert local_job.resp_command("SELECT", 12) == b"*2\r\n$6\r\nSELECT\r\n$2\r\n12\r\n"
    # Lengths count bytes, not characters.
    assert local_job.resp_command("LPUSH", "q", "é") == (
        b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$2\r\n\xc3\xa9\r\n"
    )


def test_it_splits_replies_and_raises_the_servers_error() -> None:
    assert local_job.read_resp_reply(b"+OK\r\n:3\r\n") == (b"+OK", b":3\r\n")
    assert local_job.read_resp_reply(b":3\r\n") == (b":3", b"")
    with pytest.raises(IndexError):
        local_job.read_resp_reply(b"+O")
    with pytest.raises(RuntimeError, match="WRONGPASS invalid"):
        local_job.read_resp_reply(b"-WRONGPASS invalid username-password pair\r\n")
    with pytest.raises(ValueError, match="unexpected"):
        local_job.read_resp_reply(b"$5\r\nhello\r\n")


def test_the_message_is_a_celery_protocol_2_task_in_kombus_redis_envelope() -> None:
    message = local_job.celery_message(TASK, [7], QUEUE, "0f0e-id")

    args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([7], {})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert message["headers"]["task"] == TASK
    assert message["headers"]["id"] == message["headers"]["root_id"] == "0f0e-id"
    assert message["headers"]["argsrepr"] == "(7,)"
    properties = message["properties"]
    assert properties["body_encoding"] == "base64"
    assert properties["delivery_info"] == {"exchange": "", "routing_key": QUEUE}
    assert properties["priority"] == 0 and properties["delivery_tag"] != "0f0e-id"


class _FakeRedis:
    """A one-connection server that records what it is sent and answers each command with the
    next of ``replies``."""

    def __init__(self, replies: list[bytes], *, drop: int = 0) -> None:
        self.replies = replies
        self.drop = drop  # connections closed at once, before the one that is served
        self.received = b""
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(self.drop):
            self.server.accept()[0].close()
        connection, _ = self.server.accept()
        with connection:
            connection.settimeout(5)
            while self.received.count(b"*") < len(self.replies):
                chunk = connection.recv(65536)
                if not chunk:
                    return
                self.received += chunk
            connection.sendall(b"".join(self.replies))

    def close(self) -> None:
        self.thread.join(timeout=5)
        self.server.close()


def test_it_authenticates_and_selects_the_db_before_the_push_in_one_round_trip() -> None:
    fake = _FakeRedis([b"+OK\r\n", b"+OK\r\n", b":1\r\n"])
    try:
        length = local_job.push_to_redis(
            local_job.parse_redis_url(f"redis://ops:pw@127.0.0.1:{fake.port}/5"), "q", "{}"
        )
    finally:
        fake.close()

    assert length == 1
    assert fake.received == (
        local_job.resp_command("AUTH", "ops", "pw")
        + local_job.resp_command("SELECT", 5)
        + local_job.resp_command("LPUSH", "q", "{}")
    )


def test_a_dropped_connection_is_tried_again() -> None:
    fake = _FakeRedis([b":1\r\n"], drop=2)
    try:
        outcome = local_job.push_completion(_callback([8], f"redis://127.0.0.1:{fake.port}"))
    finally:
        fake.close()

    assert outcome.startswith(f"completion pushed: {TASK}[8] to {QUEUE}")
    assert fake.received.startswith(b"*3\r\n$5\r\nLPUSH\r\n")


def test_a_wrong_password_is_reported_as_a_failed_push() -> None:
    fake = _FakeRedis([b"-WRONGPASS invalid password\r\n", b":1\r\n"])
    try:
        outcome = local_job.push_completion(_callback([4], f"redis://:bad@127.0.0.1:{fake.port}"))
    finally:
        fake.close()

    assert outcome.startswith("completion push failed") and "WRONGPASS" in outcome
    assert "bad" not in outcome.replace("bad@", "")  # the password is not echoed


def test_a_redis_that_does_not_answer_fails_the_push_quickly_and_quietly() -> None:
    started = time.monotonic()
    outcome = local_job.push_completion(_callback([4], "redis://127.0.0.1:1/0"))

    assert outcome.startswith("completion push failed") and "the poll finds it" in outcome
    assert time.monotonic() - started < 5


def test_the_wrapper_pushes_to_redis_without_kombu_socket_or_json() -> None:
    # The push is on every step's path; its imports are what made it slow (kombu 0.2-0.5 s,
    # json with re and enum 7 ms, socket with enum and selectors, the IDNA codec for a str host).
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import local_job; "
        "print(local_job.push_completion(sys.argv[2])); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kombu', 'celery', 'redis', 'socket', 'selectors', 'uuid', 'site', 'json', 're', "
        "'enum') or m == 'encodings.idna'))"
    )
    probe = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            code,
            str(Path(local_job.__file__).parent),
            _callback([4], "redis://127.0.0.1:1/0"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )

    pushed, modules = probe.stdout.strip().splitlines()
    assert pushed.startswith("completion push failed")
    assert modules == "[]"


# --- against a real Redis ------------------------------------------------------------------------


def test_the_message_has_the_shape_kombu_gives_it_on_redis(redis_db: Any) -> None:
    assert local_job.push_completion(_callback([5])).startswith("completion pushed")
    # The kombu path, kept for other brokers, can still be driven on Redis for comparison.
    task_id = local_job._push_with_kombu(REDIS_URL, {}, TASK, [5], QUEUE)

    # LPUSH puts the newest first.
    kombus, ours = (json.loads(raw) for raw in redis_db.lrange(QUEUE, 0, -1))
    assert kombus["headers"]["id"] == task_id

    def shape(message: dict[str, Any]) -> dict[str, Any]:
        ids = {"id", "root_id", "correlation_id", "delivery_tag"}
        return {
            key: shape(value) if isinstance(value, dict) else ("<id>" if key in ids else value)
            for key, value in message.items()
            if key != "body"
        }

    assert shape(ours) == shape(kombus)
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(
        base64.b64decode(kombus["body"])
    )


def test_the_push_honours_the_global_key_prefix(redis_db: Any) -> None:
    local_job.push_completion(_callback([6], global_keyprefix="site-a:"))

    assert redis_db.llen("site-a:" + QUEUE) == 1
    assert redis_db.llen(QUEUE) == 0


def test_a_celery_worker_on_redis_runs_the_task_the_wrapper_pushes(
    redis_db: Any, tmp_path: Path
) -> None:
    # A real worker on Redis DB 12, with a stand-in for the result-manager's task under its real
    # name, consuming the queue the router names; the job goes through the real local backend.
    done = tmp_path / "finished.txt"
    (tmp_path / "standin.py").write_text(
        "from celery import Celery\n"
        f"app = Celery('standin', broker={REDIS_URL!r})\n"
        "@app.task(name='pipelines.tasks.run_job_finished')\n"
        "def run_job_finished(run_id):\n"
        f"    open({str(done)!r}, 'a').write(f'{{run_id}}\\n')\n"
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "standin",
            "worker",
            "-Q",
            QUEUE,
            "-P",
            "solo",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
        ],
        cwd=tmp_path,
        # CELERY_BROKER_URL in the environment would win over the app's own broker.
        env={k: v for k, v in os.environ.items() if not k.startswith("CELERY_")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    backend = LocalBackend(state_dir=tmp_path / "jobs", cancel_grace_seconds=1)
    job = JobSpec(
        name="run-91-1",
        command=["sh", "-c", "exit 0"],
        run_dir=tmp_path / "run-91-1",
        env={JOB_DONE_CALLBACK_ENV: _callback([91])},
    )
    try:
        job_id = backend.submit(job)
        deadline = time.monotonic() + 60
        while not done.exists():
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline, "the worker never ran the task"
            time.sleep(0.1)
        assert done.read_text() == "91\n"
        assert backend.get_status([job_id])[job_id].state == "completed"
        wrapper_log = (job.run_dir / "logs" / "wrapper.log").read_text()
        assert f"completion pushed: {TASK}[91] to {QUEUE}" in wrapper_log
    finally:
        worker.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.communicate(timeout=30)
