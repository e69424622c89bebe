"""The local backend: jobs run as detached processes on this host (the embedded default).

A job is the wrapper ``local_job.py`` in a session of its own, running the command in a process
group of its own and writing everything the backend needs to know under ``run_dir/logs`` (see
that module for the file contract). Nothing lives in this object or in the worker: a new
instance, in a new worker, after a restart, reads a job's state from its files, so a job survives
a worker restart and its end is never lost.

Job ids are ``local:{name}:{digest}``, ``digest`` a hash of the run directory, short enough for
``hpc_job_id`` whatever the path. ``state_dir`` maps ids to run directories (one symlink per
job, created atomically; default ``settings.LOCAL_BACKEND_DIR``, else ``VAR_DIR/local_jobs``).

Files under ``run_dir/logs``: ``submitted.json`` (written by ``submit`` before the process is
started), ``.submit.lock`` (serialises submitters of one run directory), ``.alive.lock`` (held
by the job's processes while any lives), ``job.json``, ``stdout.log``, ``stderr.log``,
``exit_code``, ``cancel_requested`` and ``wrapper.log`` (the wrapper's own messages).

Status, in order: ``exit_code`` present -> completed (0) or failed (reason from the file);
no ``submitted.json`` -> failed "unknown job"; alive lock held -> running (pending until
``job.json`` exists); otherwise failed "cancelled" when a cancel was requested, else "lost".
Limits: the host that reads a job's status must be the host that runs it (flock), and
``memory_gb``/``cpu`` are not enforced (``time_hours`` is, by the wrapper). A job leaves the
worker's session but not its cgroup: under systemd, run the worker with ``KillMode=process``
(``mixed`` still SIGKILLs the rest of the cgroup at the end of a stop), or a restart of the unit
kills its jobs too (they are then reported "lost").
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import py_compile
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .base import Backend, BackendError, JobSpec, JobStatus, inherited_environment, read_json
from .local_job import write_json_atomic

WRAPPER = Path(__file__).with_name("local_job.py")
# state_dir -> the wrapper compiled there (or the source when that failed), per process.
_compiled: dict[Path, Path] = {}


def compiled_wrapper(state_dir: Path) -> Path:
    """The wrapper as bytecode in ``state_dir`` (``local_job.<tag>.<source hash>.pyc``), made
    once: Python compiles a script it is given as source on every start, which was a third of
    the wrapper's own start-up. The name holds the interpreter's cache tag and the source's
    hash, so another Python or another version of the wrapper gets its own file; made again
    when it was deleted. Falls back to the source when the bytecode cannot be written."""
    known = _compiled.get(state_dir)
    # A stat per submit: a cleaned-up state directory must not leave jobs without a wrapper.
    if known is not None and known.exists():
        return known
    source = WRAPPER.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = state_dir / f"local_job.{sys.implementation.cache_tag}.{digest}.pyc"
    try:
        if not target.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            py_compile.compile(str(WRAPPER), cfile=str(partial), doraise=True)
            os.replace(partial, target)
        _compiled[state_dir] = target
    except (OSError, py_compile.PyCompileError):
        _compiled[state_dir] = WRAPPER
    return _compiled[state_dir]


# Beyond the base set (``backends.base.INHERITED_ENV``): what container runtimes on this host
# need to be reached, and the TLS trust store.
LOCAL_ENV = frozenset({"XDG_RUNTIME_DIR", "DOCKER_HOST", "CONTAINER_HOST"})
LOCAL_ENV_PREFIXES = ("SSL_CERT_",)


def _iso(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(logs: Path) -> bool:
    """True while a process of the job holds the alive lock (a shared probe never blocks and
    never delays the job)."""
    try:
        fd = os.open(logs / ".alive.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


# Wrappers this process started and has not reaped yet: a finished wrapper stays a zombie until
# its parent waits for it, and a worker may submit for days.
_spawned: list[subprocess.Popen[bytes]] = []


def _reap() -> None:
    _spawned[:] = [proc for proc in _spawned if proc.poll() is None]


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - limit))
            data = handle.read()
    except FileNotFoundError:
        return ""
    prefix = f"[... {size - limit} earlier bytes not shown]\n" if size > limit else ""
    return prefix + data.decode("utf-8", errors="replace")


class LocalBackend(Backend):
    name = "local"

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        python: str | None = None,
        cancel_grace_seconds: float = 5.0,
    ) -> None:
        if state_dir is None:
            from django.conf import settings

            state_dir = Path(
                getattr(settings, "LOCAL_BACKEND_DIR", None)
                or Path(settings.VAR_DIR) / "local_jobs"
            )
        self.state_dir = Path(state_dir)
        self.python = python or sys.executable
        self.cancel_grace_seconds = cancel_grace_seconds

    # --- ids --------------------------------------------------------------------------------

    @staticmethod
    def job_id_for(spec: JobSpec) -> str:
        digest = hashlib.sha256(str(Path(spec.run_dir).resolve()).encode()).hexdigest()[:16]
        return f"local:{spec.name}:{digest}"

    def _entry(self, job_id: str) -> Path:
        if not job_id.startswith("local:") or "/" in job_id or job_id.count(":") != 2:
            raise BackendError(f"{job_id!r} is not a local backend job id")
        return self.state_dir / job_id.removeprefix("local:").replace(":", ".")

    def _run_dir(self, job_id: str) -> Path | None:
        try:
            return Path(os.readlink(self._entry(job_id)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _register(self, job_id: str, run_dir: Path) -> None:
        entry = self._entry(job_id)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(run_dir, entry)
        except FileExistsError:
            if Path(os.readlink(entry)) != run_dir:
                raise BackendError(
                    f"job id {job_id} is already registered for {os.readlink(entry)}"
                ) from None

    # --- the interface ----------------------------------------------------------------------

    def find(self, spec: JobSpec) -> str | None:
        job_id = self.job_id_for(spec)
        run_dir = self._run_dir(job_id)
        if run_dir is None:
            return None
        marker = read_json(run_dir / "logs" / "submitted.json")
        return job_id if marker is not None and marker.get("name") == spec.name else None

    def submit(self, spec: JobSpec) -> str:
        self.validate_resources(spec.resources)
        run_dir = Path(spec.run_dir).resolve()
        logs = run_dir / "logs"
        job_id = self.job_id_for(spec)
        try:
            logs.mkdir(parents=True, exist_ok=True)
            self._register(job_id, run_dir)
        except OSError as error:
            raise BackendError(f"job {spec.name}: cannot prepare {logs}: {error}") from error
        # One submitter per run directory at a time; the lock dies with a crashed submitter.
        with _flock(logs / ".submit.lock"):
            marker = read_json(logs / "submitted.json")
            if marker is not None:
                if marker.get("name") != spec.name:
                    raise BackendError(
                        f"{run_dir} already holds job {marker.get('name')!r}; "
                        f"refusing to start {spec.name!r} there"
                    )
                return job_id
            self._start(spec, run_dir, job_id)
        return job_id

    def _start(self, spec: JobSpec, run_dir: Path, job_id: str) -> None:
        logs = run_dir / "logs"
        # Taken before the marker is written and handed to the job: from the moment the
        # marker exists until the job's last process ends, a status probe sees the lock held,
        # so a job is never reported lost while it starts.
        lock_fd = os.open(logs / ".alive.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._lock_for_start(lock_fd, spec)
            write_json_atomic(
                logs / "submitted.json",
                {
                    "name": spec.name,
                    "job_id": job_id,
                    "command": spec.command,
                    "resources": spec.resources,
                    "submitted_at": datetime.now(UTC).isoformat(),
                },
            )
            # The bytecode suits only the interpreter that compiled it.
            wrapper = compiled_wrapper(self.state_dir) if self.python == sys.executable else WRAPPER
            argv = [self.python, "-S", str(wrapper), str(run_dir), "--lock-fd", str(lock_fd)]
            argv += ["--grace", f"{self.cancel_grace_seconds:g}"]
            if "time_hours" in spec.resources:
                argv += ["--time-limit", f"{float(spec.resources['time_hours']) * 3600:g}"]
            argv += ["--", *spec.command]
            try:
                with open(logs / "wrapper.log", "ab") as wrapper_log:
                    # Not waited for: the job belongs to no worker; finished wrappers are
                    # reaped at this process's next submit (_reap).
                    _reap()
                    _spawned.append(
                        subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=wrapper_log,
                            stderr=subprocess.STDOUT,
                            cwd=run_dir,
                            env=self._environment(spec.env),
                            start_new_session=True,
                            pass_fds=(lock_fd,),
                        )
                    )
            except OSError as error:
                # The marker stays, so a retried submit returns this id and reads this failure
                # instead of starting the job a second time.
                write_json_atomic(
                    logs / "exit_code",
                    {"exit_code": None, "reason": f"cannot start the job wrapper: {error}"},
                )
                raise BackendError(f"job {spec.name}: cannot start: {error}") from error
        finally:
            os.close(lock_fd)

    @staticmethod
    def _lock_for_start(lock_fd: int, spec: JobSpec) -> None:
        # Status probes take the lock shared only once the marker exists, so it is free here;
        # the loop covers a probe that read an older marker of a directory being reused.
        deadline = time.monotonic() + 2
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"job {spec.name}: processes of an earlier job still run in {spec.run_dir}"
                    ) from None
                time.sleep(0.01)

    @staticmethod
    def _environment(extra: dict[str, str]) -> dict[str, str]:
        return {**inherited_environment(LOCAL_ENV, LOCAL_ENV_PREFIXES), **extra}

    def get_status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return {job_id: self._status(job_id) for job_id in job_ids}

    def _status(self, job_id: str) -> JobStatus:
        try:
            run_dir = self._run_dir(job_id)
        except BackendError as error:
            return JobStatus(job_id, "failed", reason=f"unknown job: {error}")
        if run_dir is None:
            return JobStatus(job_id, "failed", reason="unknown job: never submitted here")
        logs = run_dir / "logs"
        ended = read_json(logs / "exit_code")
        if ended is not None:
            return self._ended(job_id, ended, logs)
        if read_json(logs / "submitted.json") is None:
            return JobStatus(job_id, "failed", reason=f"unknown job: no submission in {logs}")
        job = read_json(logs / "job.json") or {}
        if _alive(logs):
            return JobStatus(
                job_id,
                "running" if job else "pending",
                started_at=_iso(job.get("started_at")),
            )
        # The job may have written its exit code between the first read and the probe.
        ended = read_json(logs / "exit_code")
        if ended is not None:
            return self._ended(job_id, ended, logs)
        if (logs / "cancel_requested").exists():
            reason = "cancelled"
        else:
            reason = (
                "lost: the job's processes ended without writing an exit code "
                "(killed, or the host restarted)"
            )
        return JobStatus(job_id, "failed", reason=reason, started_at=_iso(job.get("started_at")))

    @staticmethod
    def _ended(job_id: str, ended: dict[str, Any], logs: Path) -> JobStatus:
        exit_code = ended.get("exit_code")
        reason = str(ended.get("reason") or "")
        if (logs / "cancel_requested").exists() and reason.startswith("stopped by"):
            reason = "cancelled"
        ok = exit_code == 0 and not reason
        memory = ended.get("peak_memory_bytes")
        return JobStatus(
            job_id,
            "completed" if ok else "failed",
            exit_code=exit_code if isinstance(exit_code, int) else None,
            reason=reason,
            started_at=_iso(ended.get("started_at")),
            finished_at=_iso(ended.get("finished_at")),
            wall_seconds=_float(ended.get("wall_seconds")),
            cpu_seconds=_float(ended.get("cpu_seconds")),
            peak_memory_bytes=memory if isinstance(memory, int) else None,
        )

    def cancel(self, job_id: str) -> None:
        run_dir = self._run_dir(job_id)
        if run_dir is None or read_json(run_dir / "logs" / "submitted.json") is None:
            raise BackendError(f"cannot cancel {job_id}: unknown job")
        logs = run_dir / "logs"
        if (logs / "exit_code").exists():
            return  # already ended: nothing to stop, and its result stands
        write_json_atomic(logs / "cancel_requested", {"at": datetime.now(UTC).isoformat()})
        if not _alive(logs):
            return
        job = self._wait_for(logs, "job.json", seconds=5)
        if job is None:
            if not _alive(logs):
                return
            raise BackendError(f"cannot cancel {job_id}: the job did not report its process")
        # The wrapper stops the command (SIGTERM, then SIGKILL after the grace period) and
        # writes the exit code; only a wrapper that does not answer is killed from here.
        self._killpg(job.get("pgid"), signal.SIGTERM)
        if self._wait_until_dead(logs, self.cancel_grace_seconds + 3):
            return
        for key in ("child_pgid", "pgid"):
            self._killpg(job.get(key), signal.SIGKILL)
        if not self._wait_until_dead(logs, 5):
            raise BackendError(f"cannot cancel {job_id}: its processes survived SIGKILL")

    @staticmethod
    def _killpg(pgid: object, signum: int) -> None:
        if not isinstance(pgid, int) or pgid <= 1:
            return
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as error:
            raise BackendError(f"cannot signal process group {pgid}: {error}") from error

    @staticmethod
    def _wait_for(logs: Path, name: str, *, seconds: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + seconds
        while (value := read_json(logs / name)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return value

    @staticmethod
    def _wait_until_dead(logs: Path, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while _alive(logs):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def get_logs(self, job_id: str, *, tail_bytes: int = 65536) -> str:
        run_dir = self._run_dir(job_id)
        if run_dir is None:
            raise BackendError(f"no logs for {job_id}: unknown job")
        logs = run_dir / "logs"
        parts = []
        for name in ("stdout.log", "stderr.log"):
            parts.append(f"--- {name} ---\n{_tail(logs / name, tail_bytes)}")
        # The wrapper's own messages: why a job was lost before it ran, or its push failed.
        wrapper = _tail(logs / "wrapper.log", tail_bytes)
        if wrapper:
            parts.append(f"--- wrapper.log ---\n{wrapper}")
        ended = read_json(logs / "exit_code")
        if ended is not None and ended.get("reason"):
            parts.append(f"--- end ---\n{ended['reason']}\n")
        return "\n".join(parts)
