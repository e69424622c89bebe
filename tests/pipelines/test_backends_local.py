"""The local backend (pipelines/backends/local.py + local_job.py) against the backend contract:
real detached processes, status read from files by any instance, idempotent submit, batch
status in the normalised vocabulary, cancel of the whole process group, logs, lost jobs, and
the completion pushed to the broker."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from pipelines.backends.base import JOB_DONE_CALLBACK_ENV, JOB_STATES, BackendError, JobSpec
from pipelines.backends.local import WRAPPER, LocalBackend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(state_dir=tmp_path / "jobs", cancel_grace_seconds=1)


@pytest.fixture
def spec(tmp_path: Path) -> Callable[..., JobSpec]:
    def make(name: str, script: str, **kwargs: Any) -> JobSpec:
        return JobSpec(name=name, command=["sh", "-c", script], run_dir=tmp_path / name, **kwargs)

    return make


@pytest.fixture(autouse=True)
def _no_stray_jobs(tmp_path: Path) -> Iterator[None]:
    """Kill whatever a failing test left running (only the groups its own jobs recorded)."""
    yield
    for job in tmp_path.glob("*/logs/job.json"):
        info = json.loads(job.read_text())
        for key in ("child_pgid", "pgid"):
            with contextlib.suppress(ProcessLookupError, PermissionError, KeyError):
                os.killpg(info[key], signal.SIGKILL)


def wait_for(
    backend: LocalBackend, job_id: str, states: tuple[str, ...], timeout: float = 20
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status = backend.get_status([job_id])[job_id]
        if status.state in states:
            return status
        assert time.monotonic() < deadline, f"{job_id} stayed {status}"
        time.sleep(0.02)


def test_submit_returns_a_short_id_and_the_job_runs_to_completion(
    backend: LocalBackend, tmp_path: Path
) -> None:
    deep = tmp_path / ("x" * 150) / ("y" * 90) / "17-1"
    job = JobSpec(name="run-17-1", command=["sh", "-c", "echo done > out.txt"], run_dir=deep)

    job_id = backend.submit(job)

    assert job_id.startswith("local:run-17-1:")
    assert len(job_id) <= 100, "fits ExecutedReductionStep.hpc_job_id whatever the path"
    status = wait_for(backend, job_id, ("completed", "failed"))
    assert status.state == "completed", status
    assert status.exit_code == 0 and status.reason == ""
    assert status.wall_seconds is not None and status.wall_seconds >= 0
    assert status.cpu_seconds is not None and status.peak_memory_bytes
    assert status.started_at is not None and status.finished_at >= status.started_at
    assert (deep / "out.txt").read_text() == "done\n", "the command runs in run_dir"
    ended = json.loads((deep / "logs" / "exit_code").read_text())
    assert ended["exit_code"] == 0


def test_submitting_the_same_name_twice_starts_one_process(
    backend: LocalBackend, spec: Callable[..., JobSpec], tmp_path: Path
) -> None:
    job = spec("run-5-1", f"echo started >> {tmp_path}/starts; sleep 0.3")

    first = backend.submit(job)
    second = backend.submit(job)
    third = LocalBackend(state_dir=backend.state_dir).submit(job)

    assert first == second == third
    assert backend.find(job) == first
    wait_for(backend, first, ("completed",))
    assert (tmp_path / "starts").read_text() == "started\n"


def test_concurrent_submitters_of_one_job_start_one_process(
    backend: LocalBackend, spec: Callable[..., JobSpec], tmp_path: Path
) -> None:
    job = spec("run-6-1", f"echo started >> {tmp_path}/starts")
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        barrier.wait()
        ids.append(LocalBackend(state_dir=backend.state_dir).submit(job))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(ids)) == 1 and len(ids) == 6
    wait_for(backend, ids[0], ("completed",))
    assert (tmp_path / "starts").read_text() == "started\n"


def test_find_knows_only_submitted_jobs(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job = spec("run-7-1", "true")
    assert backend.find(job) is None

    job_id = backend.submit(job)

    assert backend.find(job) == job_id


def test_a_run_directory_holding_another_job_is_refused(
    backend: LocalBackend, tmp_path: Path
) -> None:
    backend.submit(JobSpec(name="run-8-1", command=["true"], run_dir=tmp_path / "shared"))

    with pytest.raises(BackendError, match="already holds job 'run-8-1'"):
        backend.submit(JobSpec(name="run-8-2", command=["true"], run_dir=tmp_path / "shared"))


def test_status_of_a_batch_in_one_call(backend: LocalBackend, spec: Callable[..., JobSpec]) -> None:
    ok = backend.submit(spec("run-1-1", "exit 0"))
    bad = backend.submit(spec("run-2-1", "echo failing >&2; exit 3"))
    slow = backend.submit(spec("run-3-1", "sleep 30"))
    missing = backend.submit(spec("run-4-1", "true")).replace("run-4-1", "run-9-9")
    wait_for(backend, ok, ("completed",))
    wait_for(backend, bad, ("failed",))
    wait_for(backend, slow, ("running",))

    statuses = backend.get_status([ok, bad, slow, missing, "slurm:123"])

    assert list(statuses) == [ok, bad, slow, missing, "slurm:123"]
    assert {k: s.state for k, s in statuses.items()} == {
        ok: "completed",
        bad: "failed",
        slow: "running",
        missing: "failed",
        "slurm:123": "failed",
    }
    assert statuses[bad].exit_code == 3 and statuses[bad].reason == "exit code 3"
    assert statuses[slow].started_at is not None and statuses[slow].exit_code is None
    assert statuses[missing].reason.startswith("unknown job")
    assert statuses[missing].exit_code is None
    backend.cancel(slow)


def test_behaviour_51_every_state_reported_is_pending_running_completed_or_failed(
    backend: LocalBackend, spec: Callable[..., JobSpec], tmp_path: Path
) -> None:
    # Behaviour 51, with a job caught in each state: "pending" is a submitted job whose
    # wrapper holds the lock but has not reported its process yet.
    pending = spec("run-20-1", "true")
    logs = pending.run_dir / "logs"
    logs.mkdir(parents=True)
    lock = os.open(logs / ".alive.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    (logs / "submitted.json").write_text(json.dumps({"name": "run-20-1"}))
    backend._register(backend.job_id_for(pending), pending.run_dir.resolve())
    ids = {
        "pending": backend.job_id_for(pending),
        "running": backend.submit(spec("run-21-1", "sleep 30")),
        "completed": backend.submit(spec("run-22-1", "true")),
        "failed": backend.submit(spec("run-23-1", "false")),
    }
    try:
        for expected, job_id in ids.items():
            status = wait_for(backend, job_id, (expected,))
            assert status.state in JOB_STATES
        statuses = backend.get_status(list(ids.values()))
        assert {s.state for s in statuses.values()} == set(JOB_STATES)
    finally:
        os.close(lock)
        backend.cancel(ids["running"])
    assert backend.get_status([ids["pending"]])[ids["pending"]].reason.startswith("lost")


def test_a_job_outlives_its_submitter_and_a_new_instance_reads_its_end(
    tmp_path: Path,
) -> None:
    # The submitter is a separate Python process that exits at once, as a worker that
    # restarts would; the job then finishes on its own and its end is read from its files.
    code = (
        "import sys; from pathlib import Path; from pipelines.backends.base import JobSpec; "
        "from pipelines.backends.local import LocalBackend; "
        "spec = JobSpec(name='run-30-1', command=['sh', '-c', 'sleep 1; echo late; exit 7'], "
        "run_dir=Path(sys.argv[1])); "
        "print(LocalBackend(state_dir=Path(sys.argv[2])).submit(spec))"
    )
    submitted = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run-30-1"), str(tmp_path / "jobs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job_id = submitted.stdout.strip()
    backend = LocalBackend(state_dir=tmp_path / "jobs")

    assert backend.get_status([job_id])[job_id].state in ("pending", "running")
    status = wait_for(backend, job_id, ("completed", "failed"))

    assert status.state == "failed"
    assert status.exit_code == 7 and status.reason == "exit code 7"
    assert status.wall_seconds is not None and status.wall_seconds >= 1
    assert "late" in backend.get_logs(job_id)


def test_a_job_killed_without_writing_its_exit_code_is_lost(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job = spec("run-40-1", "sleep 30")
    job_id = backend.submit(job)
    wait_for(backend, job_id, ("running",))
    info = json.loads((job.run_dir / "logs" / "job.json").read_text())

    os.killpg(info["pgid"], signal.SIGKILL)
    os.killpg(info["child_pgid"], signal.SIGKILL)

    status = wait_for(backend, job_id, ("failed",), timeout=5)
    assert status.reason.startswith("lost"), status
    assert status.exit_code is None
    assert not (job.run_dir / "logs" / "exit_code").exists()


def test_cancel_stops_the_whole_process_group(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job = spec("run-50-1", "sleep 60 & echo $! > grandchild.pid; wait")
    job_id = backend.submit(job)
    wait_for(backend, job_id, ("running",))
    deadline = time.monotonic() + 5
    while not (job.run_dir / "grandchild.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = int((job.run_dir / "grandchild.pid").read_text())

    backend.cancel(job_id)

    status = backend.get_status([job_id])[job_id]
    assert status.state == "failed" and status.reason == "cancelled"
    assert _gone(grandchild), "the command's own children are stopped too"


def test_cancel_kills_a_job_that_ignores_sigterm_after_the_grace_period(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job_id = backend.submit(spec("run-51-1", "trap '' TERM; sleep 60"))
    wait_for(backend, job_id, ("running",))
    started = time.monotonic()

    backend.cancel(job_id)

    assert time.monotonic() - started < 8
    status = backend.get_status([job_id])[job_id]
    assert status.state == "failed" and status.reason == "cancelled"


def test_cancel_leaves_a_finished_job_as_it_ended(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job_id = backend.submit(spec("run-52-1", "true"))
    wait_for(backend, job_id, ("completed",))

    backend.cancel(job_id)

    assert backend.get_status([job_id])[job_id].state == "completed"


def test_cancel_of_an_unknown_job_is_an_error(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="unknown job"):
        backend.cancel("local:run-1-1:0123456789abcdef")
    with pytest.raises(BackendError, match="not a local backend job id"):
        backend.cancel("12345")


def test_logs_hold_the_tail_of_stdout_and_stderr(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job_id = backend.submit(
        spec(
            "run-60-1",
            "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done; echo oops >&2; exit 2",
        )
    )
    wait_for(backend, job_id, ("failed",))

    logs = backend.get_logs(job_id, tail_bytes=100)

    assert "--- stdout.log ---" in logs and "--- stderr.log ---" in logs
    assert "line1999" in logs and "line0\n" not in logs
    assert "earlier bytes not shown" in logs
    assert "oops" in logs and "exit code 2" in logs
    assert "--- wrapper.log ---" not in logs, "shown only when the wrapper had something to say"
    with pytest.raises(BackendError, match="unknown job"):
        backend.get_logs("local:run-9-9:0123456789abcdef")


def test_a_command_that_cannot_start_fails_with_the_reason(
    backend: LocalBackend, tmp_path: Path
) -> None:
    job = JobSpec(name="run-70-1", command=["/nonexistent/reduce"], run_dir=tmp_path / "r")

    status = wait_for(backend, backend.submit(job), ("failed",))

    assert status.exit_code == 127
    assert "cannot start '/nonexistent/reduce'" in status.reason


def test_bad_resources_are_refused_before_anything_starts(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job = spec("run-71-1", "true", resources={"cpu": 0})

    with pytest.raises(ValidationError, match="cpu"):
        backend.submit(job)

    assert backend.find(job) is None
    assert not (job.run_dir / "logs" / "submitted.json").exists()


def test_the_job_gets_its_env_but_not_the_workers_secrets_or_the_callback(
    backend: LocalBackend, spec: Callable[..., JobSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://secret@db/ops")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    job = spec(
        "run-72-1",
        "env > env.txt",
        env={"WORKFLOW_STEP_NAME": "calibrate", JOB_DONE_CALLBACK_ENV: "{not json"},
    )

    wait_for(backend, backend.submit(job), ("completed",))

    seen = (job.run_dir / "env.txt").read_text().splitlines()
    assert "WORKFLOW_STEP_NAME=calibrate" in seen
    assert "LC_ALL=C.UTF-8" in seen
    assert not any(line.startswith(("DATABASE_URL=", JOB_DONE_CALLBACK_ENV)) for line in seen)
    # A malformed callback costs the job nothing, and the logs say what happened to it.
    _wait_for_text(job.run_dir / "logs" / "wrapper.log", "completion push failed")
    assert "completion push failed" in backend.get_logs(backend.job_id_for(job))


def test_completion_is_pushed_to_the_broker_as_the_run_job_finished_task(
    backend: LocalBackend, spec: Callable[..., JobSpec], tmp_path: Path
) -> None:
    from kombu import Connection

    folder = tmp_path / "broker"
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True)
    # Every folder in tmp_path: kombu puts an unnamed control folder in the working directory.
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": True,
    }
    callback = {
        "broker_url": "filesystem://",
        "transport_options": options,
        "task": "pipelines.tasks.run_job_finished",
        "args": [81],
        "queue": "workflow.results",
    }
    job = spec("run-81-1", "exit 0", env={JOB_DONE_CALLBACK_ENV: json.dumps(callback)})
    job_id = backend.submit(job)
    wait_for(backend, job_id, ("completed",))
    _wait_for_text(job.run_dir / "logs" / "wrapper.log", "completion pushed")

    with Connection("filesystem://", transport_options=options) as connection:
        queue = connection.SimpleQueue("workflow.results")
        message = queue.get(timeout=5)
        assert message.headers["task"] == "pipelines.tasks.run_job_finished"
        args, _kwargs, _embed = message.decode()
        assert args == [81]
        message.ack()
        queue.close()


def test_a_celery_worker_runs_the_pushed_completion_task(
    backend: LocalBackend, spec: Callable[..., JobSpec], tmp_path: Path
) -> None:
    # A real worker on the file-system broker (no service needed), with a stand-in for the
    # result-manager's task under its real name, consuming the queue the router names.
    folder = tmp_path / "broker"
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
    }
    for path in set(options.values()):
        Path(path).mkdir(parents=True)
    done = tmp_path / "finished.txt"
    (tmp_path / "standin.py").write_text(
        "from celery import Celery\n"
        f"app = Celery('standin', broker='filesystem://')\n"
        f"app.conf.broker_transport_options = {options!r}\n"
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
            "workflow.results",
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
    try:
        callback = {
            "broker_url": "filesystem://",
            "transport_options": options,
            "task": "pipelines.tasks.run_job_finished",
            "args": [83],
            "queue": "workflow.results",
        }
        job = spec("run-83-1", "exit 0", env={JOB_DONE_CALLBACK_ENV: json.dumps(callback)})
        wait_for(backend, backend.submit(job), ("completed",))

        deadline = time.monotonic() + 60
        while not done.exists():
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline, "the worker never ran the task"
            time.sleep(0.1)
        assert done.read_text() == "83\n"
    finally:
        worker.terminate()
        worker.communicate(timeout=30)


def test_an_unreachable_broker_does_not_fail_the_job(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    callback = {"broker_url": "redis://127.0.0.1:1/0", "task": "x", "args": [1]}
    job = spec("run-82-1", "exit 0", env={JOB_DONE_CALLBACK_ENV: json.dumps(callback)})
    job_id = backend.submit(job)

    assert wait_for(backend, job_id, ("completed", "failed")).state == "completed"
    _wait_for_text(job.run_dir / "logs" / "wrapper.log", "completion push failed", timeout=40)


def test_the_wrapper_stops_a_command_at_its_time_limit(tmp_path: Path) -> None:
    # The backend passes time_hours * 3600 (at least a minute); the wrapper is driven directly
    # here with half a second.
    logs = tmp_path / "logs"
    logs.mkdir()
    lock = os.open(logs / ".alive.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        subprocess.run(
            [
                sys.executable,
                "-S",
                str(WRAPPER),
                str(tmp_path),
                "--lock-fd",
                str(lock),
                "--time-limit",
                "0.5",
                "--grace",
                "0.5",
                "--",
                "sleep",
                "30",
            ],
            pass_fds=(lock,),
            timeout=20,
            check=True,
        )
    finally:
        os.close(lock)

    ended = json.loads((logs / "exit_code").read_text())
    assert ended["reason"] == f"time limit of {0.5 / 3600:g} h exceeded"
    assert ended["signal"] == signal.SIGTERM and ended["exit_code"] == 128 + signal.SIGTERM
    assert ended["wall_seconds"] < 10


def test_the_wrapper_starts_without_django_site_packages_or_heavy_modules() -> None:
    # Every pipeline step pays for the wrapper's start-up.
    code = (
        f"import sys; path = {str(WRAPPER)!r}; "
        "exec(compile(open(path).read(), path, 'exec'), {'__name__': 'probe'}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('django', 'celery', 'kombu', 'json', 'subprocess', 'pathlib', 'enum', 'signal')))"
    )
    probe = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=30, check=True
    )

    assert probe.stdout.strip() == "[]"


def _wait_for_text(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return
        assert time.monotonic() < deadline, f"{text!r} not in {path}: {content!r}"
        time.sleep(0.05)


def _gone(pid: int, timeout: float = 3) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its new parent to reap it counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def test_cancel_of_a_job_already_lost_marks_it_cancelled(
    backend: LocalBackend, spec: Callable[..., JobSpec]
) -> None:
    job = spec("run-53-1", "true")
    logs = job.run_dir / "logs"
    logs.mkdir(parents=True)
    (logs / "submitted.json").write_text(json.dumps({"name": "run-53-1"}))
    job_id = backend.job_id_for(job)
    backend._register(job_id, job.run_dir.resolve())
    assert backend.get_status([job_id])[job_id].reason.startswith("lost")

    backend.cancel(job_id)

    status = backend.get_status([job_id])[job_id]
    assert (status.state, status.reason) == ("failed", "cancelled")


def test_jobs_start_the_wrapper_from_bytecode_compiled_once(
    backend: LocalBackend, spec: Callable[..., JobSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    import py_compile

    from pipelines.backends import local

    first = backend.submit(spec("run-90-1", "true"))
    second = backend.submit(spec("run-91-1", "true"))

    compiled = list(backend.state_dir.glob("local_job.*.pyc"))
    assert len(compiled) == 1
    for job_id in (first, second):
        assert wait_for(backend, job_id, ("completed", "failed")).state == "completed"
    compiled[0].unlink()
    third = backend.submit(spec("run-92-1", "true"))
    assert wait_for(backend, third, ("completed", "failed")).state == "completed"
    assert compiled[0].exists(), "made again after a clean-up"

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise py_compile.PyCompileError(SyntaxError, SyntaxError("x"), "local_job.py")

    monkeypatch.setattr(local, "_compiled", {})
    monkeypatch.setattr(py_compile, "compile", broken)
    other = backend.state_dir / "elsewhere"
    assert local.compiled_wrapper(other) == WRAPPER, "the source when bytecode cannot be made"
