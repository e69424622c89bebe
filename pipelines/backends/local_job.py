"""The local backend's job wrapper: runs one job's command detached and leaves its end in files.

    python -S local_job.py RUN_DIR --lock-fd N [--time-limit S] [--grace S] -- ARGV...

Started by ``LocalBackend.submit`` in a session of its own, so the job outlives the worker that
submitted it. Every step of a pipeline pays for this wrapper's start, so it runs with ``-S`` (no
site-packages), from bytecode compiled once (``local.compiled_wrapper``), and imports only
``os``, ``sys``, ``_signal`` and ``time``: no Django, no ``json``/``subprocess``/``pathlib``
(the command is started with ``posix_spawn`` and reaped with ``wait4``, which also gives its
resource usage). Contract with ``local.py``, all under ``RUN_DIR/logs``:

- ``job.json``: written once the command is spawned: wrapper pid and process group, the
  command's pid and process group, start time, host.
- ``stdout.log`` / ``stderr.log``: the command's output.
- ``exit_code``: JSON written atomically (rename) when the command has ended: ``exit_code``
  (128 + N for a signal N), ``signal``, ``reason`` (empty on success), start and end time,
  ``wall_seconds`` (spawn to exit), ``cpu_seconds`` and ``peak_memory_bytes`` of the command
  and the children it waited for (``wait4``).
- The lock on ``.alive.lock`` (fd ``--lock-fd``, inherited from the submitter and passed on to
  the command) is held until the exit code is written and, by the command's own children,
  for as long as any of them lives; the backend probes it to tell a running job from a lost
  one without trusting pids.

SIGTERM (the backend's cancel), SIGINT and SIGHUP, and the time limit, stop the command: SIGTERM
to its process group, SIGKILL after ``--grace`` seconds. The command runs in its own process
group so that the wrapper survives to write the exit code.

Afterwards, when ``WORKFLOW_JOB_DONE_CALLBACK`` is set (``base.job_done_callback_env``), the
completion is pushed to the managers as a Celery task (message protocol 2, published with
kombu: a tenth of the start-up of Celery itself), best effort: a broker that is down costs the
job nothing, the result-manager's poll finds the exit code anyway.
"""

from __future__ import annotations

# The C module: ``signal`` imports enum, which was two thirds of this wrapper's start-up.
import _signal as signal
import os
import sys
import time

CALLBACK_ENV = "WORKFLOW_JOB_DONE_CALLBACK"  # same name as base.JOB_DONE_CALLBACK_ENV
PUSH_TIMEOUT_SECONDS = 20

# JSON string escapes: the files this wrapper writes hold only flat objects of strings, numbers
# and null, and importing ``json`` would cost more than the rest of the wrapper's start.
_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\"} | {c: f"\\u{c:04x}" for c in range(0x20)}


def to_json(value: object) -> str:
    """JSON for a flat dict of str, int, float, bool and None values (and lists of str)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else "null"
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPES) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(to_json(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{to_json(str(k))}: {to_json(v)}" for k, v in sorted(value.items()))
        return "{" + ", ".join(items) + "}"
    return to_json(str(value))


def write_json_atomic(path: str | os.PathLike[str], value: dict[str, object]) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename, so a reader
    sees the whole file or none."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    partial = os.path.join(directory, f".{name}.{os.getpid()}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(to_json(value))
    os.replace(partial, path)


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}+00:00"


_SIGNAL_NAMES = {
    getattr(signal, name): name
    for name in dir(signal)
    if name.startswith("SIG") and not name.startswith(("SIG_", "SIGRT"))
}


def signal_name(signum: int) -> str:
    return _SIGNAL_NAMES.get(signum, f"signal {signum}")


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
            self.stop_reason = f"stopped by {signal_name(signum)}"
        self.terminate()

    def on_alarm(self, _signum: int, _frame: object) -> None:
        if self.killing:
            self.signal_child(signal.SIGKILL)
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
        self.signal_child(signal.SIGTERM)
        signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.01))

    def signal_child(self, signum: int) -> None:
        if self.child_pgid is None:
            return
        try:
            os.killpg(self.child_pgid, signum)
        except ProcessLookupError:  # the group is already gone
            return


def push_completion(callback_json: str) -> str:
    """Publish the completion task described by ``callback_json`` (a Celery protocol 2 message
    on the named queue); returns what happened, in words, and never raises."""

    def give_up(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"no broker answer within {PUSH_TIMEOUT_SECONDS} s")

    try:
        import json
        import uuid

        callback = json.loads(callback_json)
        task, args, queue = callback["task"], list(callback.get("args", [])), callback["queue"]
        # Site-packages were left out at start (-S); the push is the one place that needs them.
        import site

        site.main()
        signal.signal(signal.SIGALRM, give_up)
        signal.alarm(PUSH_TIMEOUT_SECONDS)
        from kombu import Connection

        task_id = str(uuid.uuid4())
        headers = {
            "lang": "py",
            "task": task,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": [None, None],
            "argsrepr": repr(tuple(args)),
            "kwargsrepr": "{}",
            "origin": f"local_job@{os.uname().nodename}",
        }
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        with Connection(
            callback["broker_url"],
            transport_options=callback.get("transport_options") or {},
            connect_timeout=5,
        ) as connection:
            producer = connection.Producer(serializer="json")
            producer.publish(
                [args, {}, embed],
                exchange="",
                routing_key=queue,
                headers=headers,
                correlation_id=task_id,
                delivery_mode=2,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
        signal.alarm(0)
        return f"completion pushed: {task}{args} to {queue} as {task_id}"
    except Exception as error:  # best effort: the result-manager's poll is the safety net
        signal.alarm(0)
        return f"completion push failed ({error!r}); the poll finds it"


def _exit_reason(spawn_error: str, stop_reason: str, signum: int | None, code: int) -> str:
    if spawn_error:
        return spawn_error
    if stop_reason:
        return stop_reason
    if signum is not None:
        return f"killed by {signal_name(signum)}"
    return f"exit code {code}" if code else ""


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") < 1:
        print("usage: local_job.py RUN_DIR --lock-fd N [--time-limit S] -- ARGV", file=sys.stderr)
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    run_dir = options[0]
    settings = dict(zip(options[1::2], options[2::2], strict=False))
    lock_fd = int(settings["--lock-fd"])
    time_limit = float(settings["--time-limit"]) if "--time-limit" in settings else None
    job = Job(time_limit, float(settings.get("--grace", "5")))
    for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop_signal, job.on_stop_signal)
    signal.signal(signal.SIGALRM, job.on_alarm)

    logs = os.path.join(run_dir, "logs")
    env = dict(os.environ)
    callback = env.pop(CALLBACK_ENV, "")
    workspace = os.path.join(run_dir, "workspace")
    os.chdir(workspace if os.path.isdir(workspace) else run_dir)
    out_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.path.join(logs, "stdout.log"), out_flags, 0o644),
        (os.POSIX_SPAWN_OPEN, 2, os.path.join(logs, "stderr.log"), out_flags, 0o644),
    ]
    started_at = now_iso()
    start = time.monotonic()
    spawn_error = ""
    status, rusage = 0, None
    try:
        # The lock fd is inheritable (the submitter passed it), so the command holds it too.
        pid = os.posix_spawnp(command[0], command, env, file_actions=file_actions, setpgroup=0)
    except OSError as error:
        spawn_error = f"cannot start {command[0]!r}: {error.strerror or error}"
        with open(os.path.join(logs, "stderr.log"), "a", encoding="utf-8") as err:
            err.write(spawn_error + "\n")
        pid = 0
    if pid:
        job.child_pgid = pid
        write_json_atomic(
            os.path.join(logs, "job.json"),
            {
                "pid": os.getpid(),
                "pgid": os.getpgrp(),
                "child_pid": pid,
                "child_pgid": pid,
                "started_at": started_at,
                "host": os.uname().nodename,
            },
        )
        if job.stop_reason:  # a cancel that came before the group was known
            job.terminate()
        elif time_limit is not None:
            signal.setitimer(signal.ITIMER_REAL, max(time_limit, 0.01))
        _pid, status, rusage = os.wait4(pid, 0)
    # What stopped the command is decided when it ended: a signal that comes in after (a cancel
    # racing the end) does not turn a finished job into a stopped one.
    stop_reason = job.stop_reason
    wall = time.monotonic() - start
    signal.setitimer(signal.ITIMER_REAL, 0)
    returncode = os.waitstatus_to_exitcode(status) if pid else 127
    signum = -returncode if returncode < 0 else None
    exit_code = 128 + signum if signum is not None else returncode
    write_json_atomic(
        os.path.join(logs, "exit_code"),
        {
            "exit_code": exit_code,
            "signal": signum,
            "reason": _exit_reason(spawn_error, stop_reason, signum, exit_code),
            "started_at": started_at,
            "finished_at": now_iso(),
            "wall_seconds": round(wall, 6),
            "cpu_seconds": round(rusage.ru_utime + rusage.ru_stime, 6) if rusage else 0.0,
            # ru_maxrss is in KiB on Linux.
            "peak_memory_bytes": rusage.ru_maxrss * 1024 if rusage else 0,
        },
    )
    # The exit code tells the rest; holding the lock through the push would only delay a
    # cancel's return.
    os.close(lock_fd)
    if callback:
        print(f"{now_iso()} {push_completion(callback)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
