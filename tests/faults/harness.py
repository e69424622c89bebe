"""The fault-injection harness: a facility of real processes to break on purpose.

Each test gets its own PostgreSQL database (copied from a migrated template), its own
redis-server on a free loopback port, and its own data directory. It starts real ``celery
worker`` and ``celery beat`` processes against them, with short leases and ticks, pauses a
worker at a named pause point (``pipelines.faults``), checks the marker, strikes (SIGKILL, a
broker restart, a file-size limit), and then reads the outcome straight from the database.
Everything is bounded in time and torn down by the fixture, whatever happens.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2

from tests.subprocesses import ROOT, clean_env, python

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
# Short enough that a dead worker's claim comes back within seconds.
LEASE_SECONDS = 6
ENV = {
    "WORKFLOW_LEASE_SECONDS": str(LEASE_SECONDS),
    "WORKFLOW_MANAGER_INTERVAL": "1",
    "WORKFLOW_RECOVERY_INTERVAL": "2",
    "WORKFLOW_HEARTBEAT_TTL": "3",
}


def postgres_available() -> bool:
    try:
        psycopg2.connect(dbname="postgres", connect_timeout=3, **PG).close()
    except psycopg2.Error:
        return False
    return True


def admin_sql(statement: str) -> None:
    connection = psycopg2.connect(dbname="postgres", **PG)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def drop_database(name: str) -> None:
    admin_sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )
    admin_sql(f'DROP DATABASE IF EXISTS "{name}"')


def database_url(name: str) -> str:
    return f"postgres://{PG['user']}@{PG['host']}:{PG['port']}/{name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class RedisServer:
    """A redis-server of the test's own: no persistence, so a restart loses every queued task
    (the harshest broker restart)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--logfile", str(self.directory / "redis.log"),
            ],
        )  # fmt: skip
        wait_for(self.ping, timeout=10, what="redis-server to answer")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def client(self, db: int) -> Any:
        import redis

        return redis.Redis(port=self.port, db=db, socket_timeout=2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


class Facility:
    """A facility of real processes against the test's own database and Redis."""

    def __init__(self, tmp_path: Path, template: str, redis: RedisServer) -> None:
        self.tmp = tmp_path
        self.db = f"faults_{uuid.uuid4().hex[:10]}"
        admin_sql(f'CREATE DATABASE "{self.db}" TEMPLATE "{template}"')
        self.redis = redis
        self.var = tmp_path / "var"
        self.fault_dir = tmp_path / "faults"
        self.fault_dir.mkdir(parents=True)
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.overrides = {
            "DATABASE_URL": database_url(self.db),
            "CELERY_BROKER_URL": redis.url(0),
            "REDIS_URL": redis.url(1),
            "WORKFLOW_FAULT_DIR": str(self.fault_dir),
            **ENV,
        }
        self.env = clean_env(self.var, **self.overrides)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    # --- processes -------------------------------------------------------------------------------
    def python(self, code: str, timeout: float = 120) -> str:
        return python(self.var, code, timeout=timeout, **self.overrides)

    def load_demo(self, scans: int, *, keep_copies: bool = False) -> None:
        """The demo facility with ``scans`` simulated scans. ``keep_copies``: every location
        keeps its copies for a year (the demo's observatory keeps nothing once a package is
        archived), for tests that look at the buffer tars after the path has run."""
        keep = (
            "from datetime import timedelta\n"
            "from pipelines.models import DataLocation\n"
            "DataLocation.objects.update(retention_period=timedelta(days=365))\n"
            if keep_copies
            else ""
        )
        self.python(
            "from django.core.management import call_command\n"
            "call_command('load_demo_facility', verbosity=0)\n"
            + keep
            + f"call_command('simulate_observations', count={scans}, verbosity=0)\n"
        )

    def queues(self) -> str:
        return self.python(
            "from pipelines.queues import discover_queues, DEFAULT_QUEUE, MANAGERS_QUEUE\n"
            "print(','.join([*discover_queues(include_workflow=True), DEFAULT_QUEUE, "
            "MANAGERS_QUEUE]))\n"
        ).strip()

    def start_worker(
        self,
        name: str,
        *,
        pause: str | None = None,
        concurrency: int = 1,
        file_size_limit: int | None = None,
    ) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if pause:
            env["WORKFLOW_FAULT_PAUSE"] = pause

        def limit() -> None:
            # A full disk, as the worker sees it: writes past this many bytes fail with EFBIG
            # (Python ignores SIGXFSZ, so the write raises instead of killing the process).
            if file_size_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        command = [
            sys.executable, "-m", "celery", "-A", "workflow_site", "worker",
            "-Q", self.queues(), "-P", "threads", "-c", str(concurrency),
            "-n", f"{name}@localhost", "--without-mingle", "--without-gossip", "-l", "INFO",
        ]  # fmt: skip
        return self._start(name, command, env, preexec_fn=limit)

    def start_beat(self, name: str) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "celery", "-A", "workflow_site", "beat",
            "-S", "pipelines.beat:Scheduler", "--max-interval", "1", "-l", "INFO",
            "--pidfile=",
        ]  # fmt: skip
        return self._start(name, command, dict(self.env))

    def _start(
        self, name: str, command: list[str], env: dict[str, str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, **kwargs
        )
        log.close()
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def close(self) -> None:
        self.stop_all()
        drop_database(self.db)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    # --- pause points ----------------------------------------------------------------------------
    def reached(self, point: str, *, timeout: float = 60) -> dict[str, Any]:
        marker = self.fault_dir / f"{point}.reached"
        wait_for(marker.exists, timeout=timeout, what=f"a worker to reach {point}")
        return dict(json.loads(marker.read_text()))

    def release(self, point: str) -> None:
        (self.fault_dir / f"{point}.release").write_text("go")

    # --- the database, read directly -------------------------------------------------------------
    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        connection = psycopg2.connect(dbname=self.db, **PG)
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, params)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def sql_write(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        connection = psycopg2.connect(dbname=self.db, **PG)
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(statement, params)
        finally:
            connection.close()

    def packages(self) -> list[dict[str, Any]]:
        rows = self.sql(
            "SELECT p.id, p.status, p.state, p.retry_count, p.checksum, p.relative_path, "
            "l.root_path, p.failure_error_message FROM raw_data_package p "
            "LEFT JOIN data_location l ON l.id = p.origin_location_id ORDER BY p.id"
        )
        keys = ("id", "status", "state", "retry_count", "checksum", "relative_path", "root",
                "error")  # fmt: skip
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def events(self, package_id: int) -> list[tuple[str, str, str, str]]:
        return [
            (row[0], row[1], row[2], row[3])
            for row in self.sql(
                "SELECT from_state, to_state, actor, reason FROM state_event "
                "WHERE entity = 'raw_data_package' AND object_id = %s AND field = 'status' "
                "ORDER BY id",
                (str(package_id),),
            )
        ]

    def all_packaged(self) -> bool:
        packages = self.packages()
        return (
            bool(packages)
            and all(p["status"] == "completed" for p in packages)
            and not (
                self.sql("SELECT count(*) FROM raw_data_file WHERE raw_data_package_id IS NULL")[0][
                    0
                ]
            )
        )

    def copies(self, package_id: int) -> int:
        """Copies of the package in the buffer it was built in (the data path goes on to
        make more elsewhere)."""
        return int(
            self.sql(
                "SELECT count(*) FROM physical_copy c JOIN raw_data_package p "
                "ON p.id = c.raw_data_package_id WHERE p.id = %s "
                "AND c.location_id = p.origin_location_id",
                (package_id,),
            )[0][0]
        )

    def partial_files(self) -> list[Path]:
        """Partial files the data path left behind. Reduction runs' own directories
        (``<processing root>/pipelines/...``) are left out: a demo reduction still running
        writes its outputs through temporary names of its own."""
        return [
            p
            for p in (self.var / "data").rglob("*.partial")
            if "pipelines" not in p.relative_to(self.var / "data").parts
        ]

    def partial_files_left(self, within: float = 30.0) -> list[Path]:
        """Partial files still there once writes in flight had ``within`` seconds to finish or
        clean up. The data path goes on after what a test waited for (an unpack at the next
        site may be writing at that moment); a file a crashed write left behind stays, so a
        leak is still caught."""
        deadline = time.monotonic() + within
        while (left := self.partial_files()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def all_archived(facility: Facility) -> bool:
    """Every package ARCHIVED with verified PRESENT copies in two long-term archives, and no
    operation of any kind left unfinished."""
    packages = facility.sql("SELECT id, state FROM raw_data_package")
    if not packages or any(state != "archived" for _id, state in packages):
        return False
    per_package = facility.sql(
        "SELECT c.raw_data_package_id, count(*) FROM physical_copy c "
        "JOIN data_location l ON l.id = c.location_id "
        "WHERE l.location_type = 'long_term_archive' AND c.status = 'present' "
        "AND c.integrity = 'verified' GROUP BY c.raw_data_package_id"
    )
    if len(per_package) != len(packages) or any(n != 2 for _id, n in per_package):
        return False
    unfinished = facility.sql(
        "SELECT (SELECT count(*) FROM data_transfer WHERE status <> 'completed' "
        "        OR unpack_status <> 'completed') "
        "     + (SELECT count(*) FROM data_transfer_package WHERE status <> 'completed') "
        "     + (SELECT count(*) FROM long_term_archive_transfer WHERE status <> 'completed')"
    )
    return unfinished[0][0] == 0
