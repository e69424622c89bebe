"""The local backend's job wrapper: runs one job's command detached and leaves its end in files.

    python -S pipelines/backends/local_job.py RUN_DIR --lock-fd N [--time-limit S] [--grace S]
        -- ARGV...

Started by ``LocalBackend.submit`` in a session of its own, so the job outlives the worker that
submitted it. Standard library only and run with ``-S``: no Django, no site-packages at start
(the start-up cost is paid by every step of a pipeline). Contract with ``local.py``, all under
``RUN_DIR/logs``:

- ``job.json``: written once the command is spawned: wrapper pid and process group, the
  command's pid and process group, start time, host.
- ``stdout.log`` / ``stderr.log``: the command's output.
- ``exit_code``: JSON written atomically (rename) when the command has ended: ``exit_code``
  (128 + N for a signal N), ``signal``, ``reason`` (empty on success), start and end time,
  ``wall_seconds`` (spawn to exit), ``cpu_seconds`` and ``peak_memory_bytes`` from
  ``getrusage(RUSAGE_CHILDREN)``.
- The lock on ``.alive.lock`` (fd ``--lock-fd``, inherited from the submitter and passed on to
  the command) is held for as long as any process of the job lives; the backend probes it to
  tell a running job from a lost one without trusting pids.

SIGTERM (the backend's cancel), SIGINT and SIGHUP, and the time limit, stop the command: SIGTERM
to its process group, SIGKILL after ``--grace`` seconds. The command runs in its own process
group so that the wrapper survives to write the exit code.

Afterwards, when ``WORKFLOW_JOB_DONE_CALLBACK`` is set (``base.job_done_callback_env``), the
completion is pushed to the managers as a Celery task, best effort: a broker that is down costs
the job nothing, the result-manager's poll finds the exit code anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CALLBACK_ENV = "WORKFLOW_JOB_DONE_CALLBACK"  # same name as base.JOB_DONE_CALLBACK_ENV
PUSH_TIMEOUT_SECONDS = 20


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class Job:
    """The command's life: spawn, stop on request or time limit, reap."""

    def __init__(self, time_limit: float | None, grace: float) -> None:
        self.time_limit = time_limit
        self.grace = grace
        self.child_pgid: int | None = None
        self.stop_reason = ""
        self.killing = False

    def on_stop_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_reason:
            self.stop_reason = f"stopped by {signal.Signals(signum).name}"
        self.terminate()

    def on_alarm(self, _signum: int, _frame: object) -> None:
        if self.killing:
            self._signal_child(signal.SIGKILL)
            return
        if not self.stop_reason:
            hours = (self.time_limit or 0) / 3600
            self.stop_reason = f"time limit of {hours:g} h exceeded"
        self.terminate()

    def terminate(self) -> None:
        """SIGTERM to the command's group now, SIGKILL after the grace period. Before the
        command is spawned only the request is kept (``main`` calls again once it is)."""
        if self.killing or self.child_pgid is None:
            return
        self.killing = True
        self._signal_child(signal.SIGTERM)
        signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.01))

    def _signal_child(self, signum: int) -> None:
        if self.child_pgid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child_pgid, signum)


def push_completion(callback_json: str, log: Any) -> None:
    """Send the completion task described by ``callback_json``; never raises."""

    def give_up(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"no broker answer within {PUSH_TIMEOUT_SECONDS} s")

    try:
        callback = json.loads(callback_json)
        # Site-packages were left out at start (-S); the push is the one place that needs them.
        import site

        site.main()
        signal.signal(signal.SIGALRM, give_up)
        signal.alarm(PUSH_TIMEOUT_SECONDS)
        from celery import Celery

        app = Celery("workflow_job_wrapper", broker=callback["broker_url"], set_as_current=False)
        app.conf.broker_transport_options = callback.get("transport_options") or {}
        app.conf.broker_connection_retry_on_startup = False
        app.conf.broker_connection_timeout = 5
        options: dict[str, Any] = {}
        if callback.get("queue"):
            options["queue"] = callback["queue"]
        app.send_task(
            callback["task"],
            args=callback.get("args", []),
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            **options,
        )
        signal.alarm(0)
        print(f"{now_iso()} completion pushed: {callback['task']}{callback.get('args')}", file=log)
    except Exception as error:  # best effort: the result-manager's poll is the safety net
        signal.alarm(0)
        print(f"{now_iso()} completion push failed ({error!r}); the poll finds it", file=log)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(
            "usage: local_job.py RUN_DIR --lock-fd N [--time-limit S] -- ARGV...", file=sys.stderr
        )
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    run_dir = Path(options[0])
    settings = dict(zip(options[1::2], options[2::2], strict=False))
    lock_fd = int(settings["--lock-fd"])
    time_limit = float(settings["--time-limit"]) if "--time-limit" in settings else None
    job = Job(time_limit, float(settings.get("--grace", "5")))
    for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop_signal, job.on_stop_signal)
    signal.signal(signal.SIGALRM, job.on_alarm)

    logs = run_dir / "logs"
    env = dict(os.environ)
    callback = env.pop(CALLBACK_ENV, "")
    cwd = run_dir / "workspace" if (run_dir / "workspace").is_dir() else run_dir
    started_at = now_iso()
    start = time.monotonic()
    spawn_error = ""
    with open(logs / "stdout.log", "wb") as out, open(logs / "stderr.log", "wb") as err:
        try:
            # Signals that arrive while spawning are handled once the group is known.
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=env,
                process_group=0,
                pass_fds=(lock_fd,),
            )
        except OSError as error:
            spawn_error = f"cannot start {command[0]!r}: {error.strerror or error}"
            err.write(f"{spawn_error}\n".encode())
            proc = None
        if proc is not None:
            job.child_pgid = proc.pid
            write_json_atomic(
                logs / "job.json",
                {
                    "pid": os.getpid(),
                    "pgid": os.getpgrp(),
                    "child_pid": proc.pid,
                    "child_pgid": proc.pid,
                    "started_at": started_at,
                    "host": socket.gethostname(),
                },
            )
            if job.stop_reason:  # a cancel that came before the group was known
                job.terminate()
            elif time_limit is not None:
                signal.setitimer(signal.ITIMER_REAL, max(time_limit, 0.01))
            returncode = proc.wait()
        else:
            returncode = 127
    wall = time.monotonic() - start
    signal.setitimer(signal.ITIMER_REAL, 0)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    signum = -returncode if returncode < 0 else None
    exit_code = 128 + signum if signum is not None else returncode
    if spawn_error:
        reason = spawn_error
    elif job.stop_reason:
        reason = job.stop_reason
    elif signum is not None:
        reason = f"killed by {signal.Signals(signum).name}"
    elif exit_code != 0:
        reason = f"exit code {exit_code}"
    else:
        reason = ""
    write_json_atomic(
        logs / "exit_code",
        {
            "exit_code": exit_code,
            "signal": signum,
            "reason": reason,
            "started_at": started_at,
            "finished_at": now_iso(),
            "wall_seconds": round(wall, 6),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 6),
            # ru_maxrss is in KiB on Linux.
            "peak_memory_bytes": usage.ru_maxrss * 1024,
        },
    )
    if callback:
        push_completion(callback, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
