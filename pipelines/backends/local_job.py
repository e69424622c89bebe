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
completion is pushed to the managers as a Celery task (message protocol 2), best effort: a
broker that is down costs the job nothing, the result-manager's poll finds the exit code anyway.
On a ``redis://`` broker the wrapper writes the message itself, in the form kombu's Redis
transport stores it, with one ``LPUSH`` over a plain socket (stdlib only, about a millisecond);
other brokers (AMQP) are published with kombu, whose import alone took about half a second.
"""

from __future__ import annotations

# The C module: ``signal`` imports enum, which was two thirds of this wrapper's start-up.
import _signal as signal
import os
import sys
import time

CALLBACK_ENV = "WORKFLOW_JOB_DONE_CALLBACK"  # same name as base.JOB_DONE_CALLBACK_ENV
PUSH_TIMEOUT_SECONDS = 20
PUSH_RETRY_PAUSES = (0.2, 0.7)  # seconds between the attempts of a push to Redis

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


_JSON_NUMBER = frozenset("+-0123456789.eE")
_JSON_CONSTANTS = {"true": True, "false": False, "null": None}


def from_json(text: str) -> object:
    """Parse a JSON document (the completion callback) without importing ``json``, whose
    decoder brings ``re`` and ``enum``: 7 ms of the push. Strings go through the C scanner
    ``json`` itself uses (``_json.scanstring``: escapes, surrogate pairs, strictness); the rest
    is a small recursive descent. Raises ValueError on malformed input."""
    from _json import scanstring

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\n\r":
            i += 1
        return i

    def value(i: int) -> tuple[object, int]:
        i = skip(i)
        char = text[i : i + 1]
        if char == '"':
            return scanstring(text, i + 1, True)
        if char in ("{", "["):
            closing = "}" if char == "{" else "]"
            items: list[object] = []
            pairs: dict[str, object] = {}
            i = skip(i + 1)
            if text[i : i + 1] == closing:
                return (pairs if char == "{" else items), i + 1
            while True:
                if char == "{":
                    i = skip(i)
                    if text[i : i + 1] != '"':
                        raise ValueError(f"expected a key at {i}")
                    key, i = scanstring(text, i + 1, True)
                    i = skip(i)
                    if text[i : i + 1] != ":":
                        raise ValueError(f"expected ':' at {i}")
                    pairs[key], i = value(i + 1)
                else:
                    item, i = value(i)
                    items.append(item)
                i = skip(i)
                if text[i : i + 1] == closing:
                    return (pairs if char == "{" else items), i + 1
                if text[i : i + 1] != ",":
                    raise ValueError(f"expected ',' or {closing!r} at {i}")
                i += 1
        for word, constant in _JSON_CONSTANTS.items():
            if text.startswith(word, i):
                return constant, i + len(word)
        end = i
        while end < len(text) and text[end] in _JSON_NUMBER:
            end += 1
        token = text[i:end]
        if not token:
            raise ValueError(f"unexpected {text[i : i + 10]!r} at {i}")
        number: object = float(token) if any(c in token for c in ".eE") else int(token)
        return number, end

    try:
        result, end = value(0)
    except IndexError:
        raise ValueError("truncated JSON") from None
    if skip(end) != len(text):
        raise ValueError(f"extra data at {end}")
    return result


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
    on the named queue); returns what happened, in words, and never raises.

    A ``redis://`` broker gets the message straight over a socket (``push_to_redis``): importing
    kombu cost more than half a second per step. Any other broker (AMQP, ``rediss://``, the
    file-system transport) goes through kombu as before."""
    try:
        callback = from_json(callback_json)
        if not isinstance(callback, dict):
            raise ValueError("the callback is not a JSON object")
        task, args, queue = callback["task"], list(callback.get("args", [])), callback["queue"]
        broker_url = callback["broker_url"]
        options = callback.get("transport_options") or {}
        try:
            address = parse_redis_url(broker_url)
        except ValueError:  # AMQP, rediss://, the file-system broker, an unusual redis URL
            task_id = _push_with_kombu(broker_url, options, task, args, queue)
        else:
            task_id = _uuid4()
            key = str(options.get("global_keyprefix", "")) + queue
            payload = to_json(celery_message(task, args, queue, task_id))
            # As kombu's retry policy did: a broker restarting gets two more chances. A reply
            # lost after the LPUSH may leave the task twice; run_job_finished is safe to repeat.
            for pause in (*PUSH_RETRY_PAUSES, None):
                try:
                    push_to_redis(address, key, payload)
                    break
                except OSError:
                    if pause is None:
                        raise
                    time.sleep(pause)
        return f"completion pushed: {task}{args} to {queue} as {task_id}"
    except Exception as error:  # best effort: the result-manager's poll is the safety net
        return f"completion push failed ({error!r}); the poll finds it"


def _uuid4() -> str:
    """A random (version 4) UUID in its text form, without importing ``uuid`` (and ``enum``)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _task_headers(task: str, args: list[object], task_id: str) -> dict[str, object]:
    """Celery protocol 2 headers of a task sent with no options, as ``apply_async`` sets them."""
    return {
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


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def celery_message(task: str, args: list[object], queue: str, task_id: str) -> dict[str, object]:
    """The message kombu's Redis transport stores for ``task(*args)`` sent to ``queue``
    through the default exchange: a JSON envelope whose body is the base64 of the protocol 2
    payload ``[args, kwargs, embed]``, with ``body_encoding`` base64, the delivery info the
    worker acks with, a delivery tag and priority 0 (the plain list, no priority suffix)."""
    import binascii

    body = to_json([args, {}, _EMBED]).encode("utf-8")
    return {
        "body": binascii.b2a_base64(body, newline=False).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": _task_headers(task, args, task_id),
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": _uuid4(),
        },
    }


def _unquote(text: str) -> str:
    """Percent-decoding of a URL part; ``urllib.parse`` (and ``re``) only when it has any."""
    if "%" not in text:
        return text
    from urllib.parse import unquote

    return unquote(text)


def parse_redis_url(url: str) -> tuple[str, int, str | None, str | None, int]:
    """``redis://[[user]:password@]host[:port][/db][?query]`` as (host, port, user, password,
    db), the way kombu reads it: port 6379 and db 0 by default, an empty user means the
    password alone (``AUTH password``), the query is ignored. Raises ValueError for anything
    else (another scheme, a user with no password, a bad port or db), which the caller leaves
    to kombu."""
    if not url.startswith("redis://"):
        raise ValueError(f"not a redis:// URL: {url.split('@')[-1]!r}")
    rest = url[len("redis://") :].split("?", 1)[0].split("#", 1)[0]
    netloc, _, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    user = password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        if not colon:  # a user without a password: left to kombu and redis-py to read
            raise ValueError("redis URL with a user name but no password")
        user, password = _unquote(name) or None, _unquote(secret)
    if hostport.startswith("["):  # [IPv6]:port
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    port = int(port_text) if port_text else 6379
    db_text = path.strip("/")
    db = int(db_text) if db_text else 0
    if not 0 < port < 65536 or db < 0:
        raise ValueError(f"bad port or db number in redis URL ({port}, {db})")
    return host or "localhost", port, user, password, db


def resp_command(*parts: str | bytes | int) -> bytes:
    """One Redis command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def read_resp_reply(buffer: bytes) -> tuple[bytes, bytes]:
    """Split the first simple reply (``+``, ``-``, ``:``) off ``buffer``: (reply line, rest).
    Raises IndexError when the buffer holds no whole line yet, RuntimeError for an error
    reply (the server's message, e.g. a wrong password) and ValueError for anything else."""
    end = buffer.index(b"\r\n") if b"\r\n" in buffer else -1
    if end < 0:
        raise IndexError("incomplete reply")
    line, rest = buffer[:end], buffer[end + 2 :]
    if line.startswith(b"-"):
        raise RuntimeError(line[1:].decode("utf-8", "replace"))
    if not line.startswith((b"+", b":")):
        raise ValueError(f"unexpected redis reply {line[:80]!r}")
    return line, rest


def push_to_redis(
    address: tuple[str, int, str | None, str | None, int],
    key: str,
    payload: str,
    timeout: float = 5.0,
) -> int:
    """``LPUSH key payload`` on the Redis at ``address`` (as ``parse_redis_url`` gives it),
    after ``AUTH`` and ``SELECT`` as needed, in one round trip; returns the list's new length.
    Uses the C ``_socket`` module (``socket`` imports ``enum`` and ``selectors``). Raises
    OSError on a connection problem or timeout, RuntimeError on an error reply."""
    import _socket

    host, port, user, password, db = address
    commands: list[bytes] = []
    if password is not None:
        auth = ("AUTH", user, password) if user else ("AUTH", password)
        commands.append(resp_command(*auth))
    if db:
        commands.append(resp_command("SELECT", db))
    commands.append(resp_command("LPUSH", key, payload))
    last_error: OSError | None = None
    # An ASCII name as bytes: a str would import the IDNA codec first.
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    for family, kind, proto, _name, sockaddr in _socket.getaddrinfo(
        name, port, 0, _socket.SOCK_STREAM
    ):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.sendall(b"".join(commands))
            replies: list[bytes] = []
            buffer = b""
            while len(replies) < len(commands):
                try:
                    line, buffer = read_resp_reply(buffer)
                except IndexError:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("redis closed the connection") from None
                    buffer += chunk
                    continue
                replies.append(line)
            return int(replies[-1][1:])
        except OSError as error:
            last_error = error
        finally:
            sock.close()
    raise last_error or OSError(f"no address for {host!r}")


def _push_with_kombu(
    broker_url: str, options: dict[str, object], task: str, args: list[object], queue: str
) -> str:
    """Publish through kombu (any broker it knows); returns the task id. Needs site-packages,
    which the wrapper left out at start (-S), and gives up after ``PUSH_TIMEOUT_SECONDS``."""

    def give_up(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"no broker answer within {PUSH_TIMEOUT_SECONDS} s")

    import site

    site.main()
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(PUSH_TIMEOUT_SECONDS)
    try:
        from kombu import Connection

        task_id = _uuid4()
        with Connection(broker_url, transport_options=options, connect_timeout=5) as connection:
            producer = connection.Producer(serializer="json")
            producer.publish(
                [args, {}, _EMBED],
                exchange="",
                routing_key=queue,
                headers=_task_headers(task, args, task_id),
                correlation_id=task_id,
                delivery_mode=2,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
        return task_id
    finally:
        signal.alarm(0)


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
