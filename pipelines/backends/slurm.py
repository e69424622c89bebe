"""The SLURM backend: one ``sbatch`` job per run attempt, status from the scheduler itself.

Submission writes a batch script to ``run_dir/logs/job.sbatch`` (``batch_script``): the resource
flags (behaviour 29: ``{"cpu": 4, "memory_gb": 16, "time_hours": 2}`` -> ``--cpus-per-task=4
--mem=16G --time=02:00:00``), the configured partition, ``--job-name`` = ``JobSpec.name``,
``--chdir`` = the run directory and stdout/stderr in ``run_dir/logs``. The script exports
``JobSpec.env``, runs the command and writes ``logs/exit_code`` atomically (the same JSON keys
as the local backend's wrapper: ``exit_code``, ``reason``, ``started_at``, ``finished_at``,
``wall_seconds``), then exits with the command's code.

Job ids are SLURM's own numeric ids, so an operator can paste one into ``scontrol`` or
``scancel``. ``state_dir`` (``settings.SLURM_BACKEND_DIR``, default ``VAR_DIR/slurm_jobs``)
maps ids to run directories, one symlink per job, so a job that SLURM has already forgotten
(``MinJobAge``) is still found through its exit-code file.

Idempotency (a retried submit never starts a second job): under a lock on the run directory,
``submit`` first looks for ``logs/submitted.json`` (written right after ``sbatch`` answered),
then, when ``logs/job.sbatch`` exists (a submission got as far as writing it), asks ``squeue
--states=all --name=...`` for a job of that name whose working directory is this run directory
(covers a submitter killed between ``sbatch`` and the marker).

Status (``get_status``): one ``squeue --states=all --jobs=...`` call for the whole batch, which
reads the same controller record as ``scontrol show job`` (state, reason, exit code, times).
COMPLETED/FAILED carry the script's exit code; TIMEOUT, CANCELLED, NODE_FAIL, OUT_OF_MEMORY and
the other terminal states are ``failed`` with SLURM's state and reason in words. A job SLURM no
longer knows is read from its exit-code file, else from ``sacct`` when accounting runs, else it
is ``failed`` as "lost". Completion is polled, not pushed: the batch script does not send
``WORKFLOW_JOB_DONE_CALLBACK`` (it would put the broker URL into a script file on disk).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError

from .base import (
    JOB_DONE_CALLBACK_ENV,
    Backend,
    BackendError,
    JobSpec,
    JobState,
    JobStatus,
    inherited_environment,
    read_json,
    validate_resource_shape,
)

COMMAND_TIMEOUT_SECONDS = 30
# Partition limits change when an administrator edits slurm.conf: re-read them this often.
PARTITION_CACHE_SECONDS = 300
# Job ids per squeue call: keeps the command line far below ARG_MAX for any batch size.
SQUEUE_CHUNK = 1000

# squeue --Format fields, "|"-separated; WorkDir last because only a path may hold a "|".
SQUEUE_FIELDS = ("JobID", "Name", "State", "Reason", "exit_code", "StartTime", "EndTime", "WorkDir")
SQUEUE_FORMAT = ",".join(f"{field}:|" for field in SQUEUE_FIELDS[:-1]) + f",{SQUEUE_FIELDS[-1]}:"

PENDING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
)
RUNNING_STATES = frozenset(
    {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"}
)
# Terminal states other than COMPLETED/FAILED, in words for the run's failure reason.
FAILED_STATE_WORDS = {
    "TIMEOUT": "the job ran past its time limit",
    "CANCELLED": "the job was cancelled in SLURM (scancel or an administrator)",
    "NODE_FAIL": "the node running the job failed",
    "OUT_OF_MEMORY": "the job ran out of memory",
    "BOOT_FAIL": "the node could not boot for the job",
    "DEADLINE": "the job reached its deadline before it could run",
    "PREEMPTED": "the job was preempted",
    "REVOKED": "the job was revoked by a sibling cluster",
    "SPECIAL_EXIT": "the job was held after a special exit",
}

# What the sbatch process (and with --export=ALL, the job) inherits from the worker: the base
# set (``backends.base.INHERITED_ENV``) and SLURM's config. JobSpec.env is exported by the
# script itself.
SLURM_ENV = frozenset({"SLURM_CONF"})


# The batch script's last words: logs/exit_code as JSON, keys as the local backend's wrapper.
EXIT_CODE_PRINTF = (
    r"""printf '{"exit_code": %d, "reason": "%s", "started_at": "%s", "finished_at": "%s", """
    r""""wall_seconds": %d.%03d, "slurm_job_id": "%s"}\n' "$rc" "$reason" "$started_at" """
    r""""$finished_at" "$((wall_ms / 1000))" "$((wall_ms % 1000))" "${SLURM_JOB_ID:-}" """
    '> "$logs/.exit_code.partial"'
)


# --- pure functions: resources, script, parsing ----------------------------------------------


def slurm_time(hours: float) -> str:
    """``--time`` for ``hours``, rounded UP to whole minutes (a job never gets less time than the
    step asked for; 1/60 h is one minute): ``02:00:00``, ``00:01:00``, ``1-06:00:00`` from a day
    on (SLURM's days-hours form)."""
    # round() first: 0.1 * 60 is 6.000000000000001 and must not become 7 minutes.
    minutes = max(1, math.ceil(round(hours * 60, 6)))
    days, minutes = divmod(minutes, 24 * 60)
    clock = f"{minutes // 60:02d}:{minutes % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def slurm_memory(gigabytes: float) -> str:
    """``--mem`` for ``gigabytes``: ``16G`` for whole gigabytes, else megabytes rounded up
    (``0.5`` -> ``512M``). SLURM's G is 1024 M, as in the brief's ``--mem=16G``."""
    if float(gigabytes).is_integer():
        return f"{int(gigabytes)}G"
    return f"{math.ceil(round(gigabytes * 1024, 6))}M"


def resource_flags(resources: dict[str, Any], *, partition: str = "") -> list[str]:
    """The sbatch options for ``resources`` (one task on one node, ``cpu`` CPUs for it; a key
    left out leaves SLURM's default) and the partition when one is configured."""
    flags = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={int(resources.get('cpu', 1))}"]
    if "memory_gb" in resources:
        flags.append(f"--mem={slurm_memory(resources['memory_gb'])}")
    if "time_hours" in resources:
        flags.append(f"--time={slurm_time(resources['time_hours'])}")
    if partition:
        flags.append(f"--partition={partition}")
    return flags


def batch_script(spec: JobSpec, *, partition: str = "") -> str:
    """The complete batch script for ``spec``: ``#SBATCH`` options (resources, partition, job
    name, working directory, stdout/stderr under ``logs/``), ``export`` of ``spec.env`` (the
    completion-push variable left out, see the module docstring), the command, and the
    ``logs/exit_code`` JSON written by rename so a reader never sees half of it. The script exits
    with the command's exit code, so SLURM's ExitCode is the command's."""
    run_dir = Path(spec.run_dir)
    if any(c.isspace() for c in str(run_dir)):
        # #SBATCH lines split on whitespace: such a path would silently become another option.
        raise BackendError(f"job {spec.name}: run directory {run_dir} contains whitespace")
    logs = run_dir / "logs"
    options = [
        f"--job-name={spec.name}",
        f"--chdir={run_dir}",
        f"--output={logs / 'stdout.log'}",
        f"--error={logs / 'stderr.log'}",
        "--export=ALL",
        *resource_flags(spec.resources, partition=partition),
    ]
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {option}" for option in options]
    lines += [
        f"# Written by the workflow's SLURM backend for job {spec.name}; the command's exit code",
        "# goes to logs/exit_code (JSON) and is the script's exit code.",
        "",
    ]
    for key, value in sorted(spec.env.items()):
        if key == JOB_DONE_CALLBACK_ENV:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise BackendError(f"job {spec.name}: environment variable name {key!r} is not valid")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines += [
        f"logs={shlex.quote(str(logs))}",
        'rm -f "$logs/exit_code"',
        "started_at=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)",
        "start_ns=$(date +%s%N)",
        shlex.join(spec.command),
        "rc=$?",
        "end_ns=$(date +%s%N)",
        "finished_at=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)",
        "wall_ms=$(( (end_ns - start_ns) / 1000000 ))",
        'reason=""',
        'if [ "$rc" -gt 128 ]; then reason="killed by signal $((rc - 128))";',
        'elif [ "$rc" -ne 0 ]; then reason="exit code $rc"; fi',
        EXIT_CODE_PRINTF,
        'mv -f "$logs/.exit_code.partial" "$logs/exit_code"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class QueueRow:
    """One job as ``squeue --states=all`` reports it."""

    job_id: str
    name: str
    state: str
    reason: str
    exit_status: int | None  # the raw wait status: code << 8 | signal
    start: str
    end: str
    work_dir: str


def parse_squeue(text: str) -> dict[str, QueueRow]:
    """Rows of ``squeue -h -O SQUEUE_FORMAT`` keyed by job id. Array/het job suffixes are kept
    as SLURM prints them; blank lines are skipped."""
    rows: dict[str, QueueRow] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) != len(SQUEUE_FIELDS):
            continue
        job_id, name, state, reason, exit_status, start, end, work_dir = (p.strip() for p in parts)
        rows[job_id] = QueueRow(
            job_id=job_id,
            name=name,
            # "CANCELLED by 0" in some versions: the first word is the state.
            state=state.split()[0] if state else "",
            reason=reason,
            exit_status=int(exit_status) if exit_status.isdigit() else None,
            start=start,
            end=end,
            work_dir=work_dir,
        )
    return rows


def parse_key_values(line: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` record: ``Key=Value`` pairs, a value running up to the next
    `` Key=`` (values such as ``Command=`` may hold spaces)."""
    return dict(re.findall(r"(\w[\w/:]*)=(.*?)(?=\s+\w[\w/:]*=|\s*$)", line.strip()))


def slurm_minutes(value: str) -> int | None:
    """Minutes in a SLURM duration (``MaxTime``): ``UNLIMITED``/``infinite`` -> None;
    ``[days-]hours:minutes:seconds``, ``minutes:seconds``, ``minutes``, ``days-hours[:minutes]``."""
    value = value.strip()
    if value.upper() in {"UNLIMITED", "INFINITE", "NONE", "N/A", ""}:
        return None
    days = 0
    if "-" in value:
        day_part, value = value.split("-", 1)
        days = int(day_part)
        parts = [int(p) for p in value.split(":")] + [0, 0]
        hours, minutes, seconds = parts[0], parts[1], parts[2]
    else:
        parts = [int(p) for p in value.split(":")]
        if len(parts) == 3:
            hours, minutes, seconds = parts
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        else:
            hours, minutes, seconds = 0, parts[0], 0
    return days * 24 * 60 + hours * 60 + minutes + math.ceil(seconds / 60)


def _slurm_datetime(value: str) -> datetime | None:
    """SLURM prints times in the controller's local time without a zone."""
    if not value or value in {"N/A", "Unknown", "None"}:
        return None
    try:
        return datetime.fromisoformat(value).astimezone()
    except ValueError:
        return None


def _iso(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def status_from_row(row: QueueRow, ended: dict[str, Any] | None) -> JobStatus:
    """The normalised status of a job SLURM still knows. ``ended`` is the job's exit-code file
    (or None); SLURM's state decides, the file adds the wall time the script measured."""
    started = _slurm_datetime(row.start)
    finished = _slurm_datetime(row.end)
    wall = None
    if ended is not None and isinstance(ended.get("wall_seconds"), int | float):
        wall = float(ended["wall_seconds"])
    elif started and finished:
        wall = (finished - started).total_seconds()
    state: JobState
    if row.state in PENDING_STATES:
        reason = row.reason if row.reason not in ("None", "") else ""
        return JobStatus(row.job_id, "pending", reason=reason)
    if row.state in RUNNING_STATES:
        return JobStatus(row.job_id, "running", started_at=started)
    exit_code = None
    if row.exit_status is not None:
        signal_number = row.exit_status & 0x7F
        exit_code = 128 + signal_number if signal_number else row.exit_status >> 8
    if row.state in ("COMPLETED", "FAILED"):
        if exit_code is None and ended is not None and isinstance(ended.get("exit_code"), int):
            exit_code = ended["exit_code"]
        state = "completed" if row.state == "COMPLETED" and exit_code in (0, None) else "failed"
        reason = ""
        if state == "failed":
            reason = f"exit code {exit_code}" if exit_code is not None else "failed"
            if row.reason not in ("None", "", "NonZeroExitCode"):
                reason += f" (SLURM reason {row.reason})"
        return JobStatus(
            row.job_id,
            state,
            exit_code=exit_code,
            reason=reason,
            started_at=started,
            finished_at=finished,
            wall_seconds=wall,
        )
    words = FAILED_STATE_WORDS.get(row.state, "the job ended in an unexpected SLURM state")
    reason = f"SLURM {row.state}: {words}"
    if row.reason not in ("None", ""):
        reason += f" (reason {row.reason})"
    return JobStatus(
        row.job_id,
        "failed",
        exit_code=None,
        reason=reason,
        started_at=started,
        finished_at=finished,
        wall_seconds=wall,
    )


def status_from_exit_file(job_id: str, ended: dict[str, Any]) -> JobStatus:
    """The status of a job SLURM has forgotten, from the exit-code file its script wrote."""
    exit_code = ended.get("exit_code")
    reason = str(ended.get("reason") or "")
    ok = exit_code == 0 and not reason
    wall = ended.get("wall_seconds")
    return JobStatus(
        job_id,
        "completed" if ok else "failed",
        exit_code=exit_code if isinstance(exit_code, int) else None,
        reason=reason or ("" if ok else "failed"),
        started_at=_iso(ended.get("started_at")),
        finished_at=_iso(ended.get("finished_at")),
        wall_seconds=float(wall) if isinstance(wall, int | float) else None,
    )


@dataclass(frozen=True)
class PartitionLimits:
    """What one job may ask of a partition: CPUs and memory of its largest node (narrowed by
    MaxCPUsPerNode / MaxMemPerNode) and MaxTime (None = unlimited)."""

    name: str
    max_cpus: int
    max_memory_mb: int
    max_minutes: int | None


def partition_limits_from(
    partition_record: dict[str, str], node_rows: list[tuple[int, int]]
) -> PartitionLimits:
    """Limits from ``scontrol show partition -o`` (one record) and ``(cpus, memory_mb)`` of the
    partition's nodes (``sinfo -N``)."""
    cpus = max((row[0] for row in node_rows), default=0)
    memory = max((row[1] for row in node_rows), default=0)
    per_node_cpus = partition_record.get("MaxCPUsPerNode", "UNLIMITED")
    if per_node_cpus.isdigit():
        cpus = min(cpus, int(per_node_cpus))
    per_node_memory = partition_record.get("MaxMemPerNode", "UNLIMITED")
    if per_node_memory.isdigit():
        memory = min(memory, int(per_node_memory))
    return PartitionLimits(
        name=partition_record.get("PartitionName", ""),
        max_cpus=cpus,
        max_memory_mb=memory,
        max_minutes=slurm_minutes(partition_record.get("MaxTime", "UNLIMITED")),
    )


def check_against_partition(resources: dict[str, Any], limits: PartitionLimits) -> None:
    """Raise ValidationError naming the resource and the partition's limit it exceeds."""
    where = f"SLURM partition {limits.name!r}"
    cpu = resources.get("cpu")
    if cpu is not None and cpu > limits.max_cpus:
        raise ValidationError(
            f"resource 'cpu' = {cpu} is beyond {where}: a job there gets at most "
            f"{limits.max_cpus} CPUs (its largest node, capped by MaxCPUsPerNode)"
        )
    memory = resources.get("memory_gb")
    if memory is not None and memory * 1024 > limits.max_memory_mb:
        raise ValidationError(
            f"resource 'memory_gb' = {memory:g} is beyond {where}: a job there gets at most "
            f"{limits.max_memory_mb / 1024:.1f} GB ({limits.max_memory_mb} MB: its largest "
            "node, capped by MaxMemPerNode)"
        )
    hours = resources.get("time_hours")
    if hours is not None and limits.max_minutes is not None:
        asked = max(1, math.ceil(round(hours * 60, 6)))
        if asked > limits.max_minutes:
            raise ValidationError(
                f"resource 'time_hours' = {hours:g} is beyond {where}: MaxTime is "
                f"{slurm_time(limits.max_minutes / 60)}"
            )


# Partition limits by partition name ("" = the default partition): (read at, limits).
_PARTITION_CACHE: dict[str, tuple[float, PartitionLimits]] = {}


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


class SlurmBackend(Backend):
    """Runs jobs through ``sbatch``/``squeue``/``scancel`` on the host's SLURM client commands.

    ``calls`` counts the SLURM commands this instance ran, by program name (the benchmark and
    the tests read it: status of a batch is one ``squeue``)."""

    name = "slurm"

    def __init__(self, *, partition: str | None = None, state_dir: Path | None = None) -> None:
        from django.conf import settings

        if partition is None:
            partition = getattr(settings, "SLURM_PARTITION", "") or ""
        if state_dir is None:
            state_dir = Path(
                getattr(settings, "SLURM_BACKEND_DIR", None)
                or Path(settings.VAR_DIR) / "slurm_jobs"
            )
        self.partition = partition
        self.state_dir = Path(state_dir)
        self.calls: dict[str, int] = {}
        self._accounting: bool | None = None

    # --- running SLURM commands -------------------------------------------------------------

    def _run(
        self, argv: list[str], *, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.calls[argv[0]] = self.calls.get(argv[0], 0) + 1
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
                env=env,
            )
        except FileNotFoundError as error:
            raise BackendError(
                f"{argv[0]} not found: the SLURM client commands are not installed here"
            ) from error
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BackendError(f"{shlex.join(argv[:3])} ...: {error}") from error

    @staticmethod
    def _submit_environment() -> dict[str, str]:
        return inherited_environment(SLURM_ENV)

    # --- the id -> run directory index ------------------------------------------------------

    def _entry(self, job_id: str) -> Path:
        if not job_id.isdigit():
            raise BackendError(f"{job_id!r} is not a SLURM job id")
        return self.state_dir / job_id

    def _run_dir(self, job_id: str) -> Path | None:
        try:
            return Path(os.readlink(self._entry(job_id)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _register(self, job_id: str, run_dir: Path) -> None:
        """Point the index at ``run_dir``; SLURM reuses ids after its state is reset, so a
        stale entry is replaced (by rename: readers see the old or the new link)."""
        entry = self._entry(job_id)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._run_dir(job_id) == run_dir:
            return
        partial = entry.with_name(f".{job_id}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        os.symlink(run_dir, partial)
        os.replace(partial, entry)

    # --- the interface ----------------------------------------------------------------------

    def find(self, spec: JobSpec) -> str | None:
        """The id from ``logs/submitted.json`` when this run directory was submitted under
        ``spec.name``, else a job SLURM knows by that name working in this run directory."""
        run_dir = Path(spec.run_dir).resolve()
        marker = read_json(run_dir / "logs" / "submitted.json")
        if marker is not None and marker.get("name") == spec.name:
            job_id = str(marker.get("job_id", ""))
            if job_id.isdigit():
                return job_id
        result = self._run(
            ["squeue", "--states=all", f"--name={spec.name}", "-h", "-O", SQUEUE_FORMAT]
        )
        if result.returncode != 0:
            raise BackendError(f"squeue --name={spec.name}: {result.stderr.strip()}")
        for row in parse_squeue(result.stdout).values():
            # Another deployment on the same cluster may use the same run name.
            if row.name == spec.name and Path(row.work_dir) == run_dir:
                return row.job_id
        return None

    def submit(self, spec: JobSpec) -> str:
        """See ``Backend.submit``. Resources beyond the partition are a ValidationError (the
        step asks for what the cluster cannot give); a cluster that does not answer is a
        BackendError like every other SLURM failure here, so the caller may retry."""
        validate_resource_shape(spec.resources)
        check_against_partition(spec.resources, self.partition_limits())
        run_dir = Path(spec.run_dir).resolve()
        logs = run_dir / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BackendError(f"job {spec.name}: cannot create {logs}: {error}") from error
        # One submitter per run directory at a time; the lock dies with a crashed submitter.
        with _flock(logs / ".submit.lock"):
            marker = read_json(logs / "submitted.json")
            if marker is not None and marker.get("name") != spec.name:
                raise BackendError(
                    f"{run_dir} already holds job {marker.get('name')!r}; "
                    f"refusing to start {spec.name!r} there"
                )
            script = logs / "job.sbatch"
            # The script is written before sbatch runs, so without it no earlier attempt can
            # have reached SLURM and the (cluster-wide, client-filtered) squeue lookup is
            # skipped: a first submission costs one sbatch.
            existing = self.find(spec) if marker is not None or script.exists() else None
            if existing is not None:
                self._register(existing, run_dir)
                if marker is None:
                    _write_json_atomic(
                        logs / "submitted.json", {"name": spec.name, "job_id": existing}
                    )
                return existing
            script.write_text(
                batch_script(
                    JobSpec(spec.name, spec.command, run_dir, spec.env, spec.resources),
                    partition=self.partition,
                ),
                encoding="utf-8",
            )
            result = self._run(
                ["sbatch", "--parsable", str(script)], env=self._submit_environment()
            )
            job_id = result.stdout.strip().split(";")[0]
            if result.returncode != 0 or not job_id.isdigit():
                raise BackendError(
                    f"sbatch refused job {spec.name}: "
                    f"{(result.stderr or result.stdout).strip() or f'exit {result.returncode}'}"
                )
            self._register(job_id, run_dir)
            _write_json_atomic(logs / "submitted.json", {"name": spec.name, "job_id": job_id})
            return job_id

    def get_status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        answer: dict[str, JobStatus] = {}
        numeric = [job_id for job_id in dict.fromkeys(job_ids) if job_id.isdigit()]
        for job_id in job_ids:
            if not job_id.isdigit():
                answer[job_id] = JobStatus(
                    job_id, "failed", reason=f"unknown job: {job_id!r} is not a SLURM job id"
                )
        rows: dict[str, QueueRow] = {}
        for start in range(0, len(numeric), SQUEUE_CHUNK):
            rows.update(self._squeue(numeric[start : start + SQUEUE_CHUNK]))
        gone: list[str] = []
        for job_id in numeric:
            row = rows.get(job_id)
            if row is None:
                gone.append(job_id)
                continue
            ended = None
            if row.state not in PENDING_STATES | RUNNING_STATES and row.work_dir:
                ended = read_json(Path(row.work_dir) / "logs" / "exit_code")
            answer[job_id] = status_from_row(row, ended)
        if gone:
            answer.update(self._forgotten(gone))
        return answer

    def _squeue(self, job_ids: list[str]) -> dict[str, QueueRow]:
        result = self._run(
            ["squeue", "--states=all", f"--jobs={','.join(job_ids)}", "-h", "-O", SQUEUE_FORMAT]
        )
        if result.returncode != 0:
            # squeue fails the whole call when it knows none of the ids (all purged).
            if "Invalid job id" in result.stderr:
                return {}
            raise BackendError(f"squeue failed: {result.stderr.strip() or result.returncode}")
        return parse_squeue(result.stdout)

    def _forgotten(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Jobs squeue no longer lists: exit-code file, then sacct, then lost."""
        answer: dict[str, JobStatus] = {}
        unresolved: list[str] = []
        for job_id in job_ids:
            run_dir = self._run_dir(job_id)
            ended = read_json(run_dir / "logs" / "exit_code") if run_dir else None
            if ended is not None:
                answer[job_id] = status_from_exit_file(job_id, ended)
            else:
                unresolved.append(job_id)
        if unresolved and self._accounting_enabled():
            answer.update(self._sacct(unresolved))
            unresolved = [job_id for job_id in unresolved if job_id not in answer]
        for job_id in unresolved:
            if self._run_dir(job_id) is None:
                reason = (
                    f"unknown job: SLURM does not know job {job_id} and it was not submitted here"
                )
            else:
                reason = (
                    f"lost: SLURM no longer knows job {job_id} and it wrote no exit code "
                    "(purged from the controller, or the controller lost its state)"
                )
            answer[job_id] = JobStatus(job_id, "failed", reason=reason)
        return answer

    def _accounting_enabled(self) -> bool:
        if self._accounting is None:
            result = self._run(["scontrol", "show", "config"])
            storage = re.search(r"^AccountingStorageType\s*=\s*(\S+)", result.stdout, re.M)
            self._accounting = storage is not None and storage.group(1) != "accounting_storage/none"
        return self._accounting

    def _sacct(self, job_ids: list[str]) -> dict[str, JobStatus]:
        result = self._run(
            [
                "sacct",
                "-n",
                "-P",
                "-X",
                f"--jobs={','.join(job_ids)}",
                "--format=JobIDRaw,State,ExitCode,Start,End,ElapsedRaw,Reason",
            ]
        )
        if result.returncode != 0:
            return {}
        return parse_sacct(result.stdout)

    def cancel(self, job_id: str) -> None:
        """``scancel`` a job SLURM lists as pending or running; a job that ended (or that SLURM
        forgot after it was submitted here) is left alone. scancel answers 0 even for an id it
        does not know, so the job is looked up first: an unknown id is a BackendError."""
        self._entry(job_id)  # refuses a malformed id
        row = self._squeue([job_id]).get(job_id)
        if row is None:
            if self._run_dir(job_id) is not None:
                return  # SLURM forgot a job that had ended: nothing left to stop
            raise BackendError(f"cannot cancel SLURM job {job_id}: SLURM does not know it")
        if row.state not in PENDING_STATES | RUNNING_STATES:
            return
        result = self._run(["scancel", job_id])
        message = result.stderr.strip()
        if result.returncode != 0 and "already completing or completed" not in message:
            raise BackendError(f"scancel {job_id}: {message or f'exit {result.returncode}'}")

    def get_logs(self, job_id: str, *, tail_bytes: int = 65536) -> str:
        run_dir = self._run_dir(job_id)
        if run_dir is None:
            raise BackendError(f"no logs for SLURM job {job_id}: it was not submitted here")
        logs = run_dir / "logs"
        parts = [
            f"--- {name} ---\n{_tail(logs / name, tail_bytes)}"
            for name in ("stdout.log", "stderr.log")
        ]
        ended = read_json(logs / "exit_code")
        if ended is not None and ended.get("reason"):
            parts.append(f"--- end ---\n{ended['reason']}\n")
        return "\n".join(parts)

    def validate_resources(self, resources: dict[str, Any]) -> None:
        """The shape check of every backend, then the partition's limits (read from SLURM and
        cached for PARTITION_CACHE_SECONDS). Unreadable limits are a ValidationError too: a step
        saved while the cluster does not answer is refused rather than accepted blind."""
        validate_resource_shape(resources)
        try:
            limits = self.partition_limits()
        except BackendError as error:
            raise ValidationError(
                f"cannot check the resources against SLURM partition "
                f"{self.partition or '(default)'!r}: {error}"
            ) from error
        check_against_partition(resources, limits)

    def partition_limits(self) -> PartitionLimits:
        """The limits of the configured partition (the cluster's default one when
        SLURM_PARTITION is empty). Raises BackendError when SLURM does not answer or the
        partition does not exist."""
        cached = _PARTITION_CACHE.get(self.partition)
        if cached is not None and time.monotonic() - cached[0] < PARTITION_CACHE_SECONDS:
            return cached[1]
        result = self._run(["scontrol", "show", "partition", "-o"])
        if result.returncode != 0:
            raise BackendError(f"scontrol show partition: {result.stderr.strip()}")
        records = [parse_key_values(line) for line in result.stdout.splitlines() if line.strip()]
        if self.partition:
            chosen = [r for r in records if r.get("PartitionName") == self.partition]
        else:
            chosen = [r for r in records if r.get("Default") == "YES"]
        if not chosen:
            known = ", ".join(r.get("PartitionName", "?") for r in records) or "none"
            what = (
                f"partition {self.partition!r} does not exist"
                if self.partition
                else ("there is no default partition")
            )
            raise BackendError(f"SLURM {what}; partitions: {known}")
        record = chosen[0]
        nodes = self._run(["sinfo", "-h", "-N", "-p", record["PartitionName"], "-o", "%c|%m"])
        if nodes.returncode != 0:
            raise BackendError(f"sinfo -p {record['PartitionName']}: {nodes.stderr.strip()}")
        node_rows = []
        for line in nodes.stdout.splitlines():
            cpus, _, memory = line.strip().partition("|")
            if cpus.isdigit() and memory.rstrip("+").isdigit():
                node_rows.append((int(cpus), int(memory.rstrip("+"))))
        limits = partition_limits_from(record, node_rows)
        _PARTITION_CACHE[self.partition] = (time.monotonic(), limits)
        return limits


def parse_sacct(text: str) -> dict[str, JobStatus]:
    """``sacct -n -P -X --format=JobIDRaw,State,ExitCode,Start,End,ElapsedRaw,Reason`` rows as
    statuses (jobs SLURM's controller forgot, read from the accounting database)."""
    answer: dict[str, JobStatus] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 7 or not parts[0].isdigit():
            continue
        job_id, state, exit_code_text, start, end, elapsed, reason = parts[:7]
        code, _, signal_text = exit_code_text.partition(":")
        exit_code = int(code) if code.isdigit() else None
        if signal_text.isdigit() and int(signal_text):
            exit_code = 128 + int(signal_text)
        row = QueueRow(
            job_id=job_id,
            name="",
            state=state.split()[0] if state else "",
            reason=reason,
            exit_status=None,
            start=start,
            end=end,
            work_dir="",
        )
        status = status_from_row(row, None)
        if status.state in ("completed", "failed") and row.state in ("COMPLETED", "FAILED"):
            ok = row.state == "COMPLETED" and exit_code == 0
            status = JobStatus(
                job_id,
                "completed" if ok else "failed",
                exit_code=exit_code,
                reason="" if ok else f"exit code {exit_code}",
                started_at=status.started_at,
                finished_at=status.finished_at,
                wall_seconds=float(elapsed) if elapsed.isdigit() else status.wall_seconds,
            )
        answer[job_id] = status
    return answer
