"""The backend interface every HPC backend implements, and the literal registry of backends.

A backend runs one job per run attempt. The workflow-manager submits a ``JobSpec`` (its ``name``,
``run-{run_id}-{attempt}``, is unique per attempt) and stores the returned job id on the run as
``hpc_job_id``; the result-manager asks for the status of a batch of job ids in one call and
reads the normalised state (behaviour 51: ``pending``, ``running``, ``completed``, ``failed``).

Idempotency is the backend's job: ``submit`` looks the name up first, so a worker killed after
the backend accepted a job but before ``hpc_job_id`` was committed gets the same id back on its
retry, and no second process. SLURM (``--job-name`` + ``squeue``) and Kubernetes (the Job's
``metadata.name``) can honour the same contract natively, which is why the name is the key.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any, Literal, get_args

from django.core.exceptions import ImproperlyConfigured, ValidationError

JobState = Literal["pending", "running", "completed", "failed"]
JOB_STATES: tuple[str, ...] = get_args(JobState)

# The Celery task a finished job pushes (helper R's ``pipelines.tasks.run_job_finished``); the
# backend only sends it by name, so this module does not import the task.
JOB_FINISHED_TASK = "pipelines.tasks.run_job_finished"
# Environment variable that carries the push's broker and task to the job wrapper (JSON).
JOB_DONE_CALLBACK_ENV = "WORKFLOW_JOB_DONE_CALLBACK"

# Accepted resource requests: key -> (type, minimum, maximum). The same ranges as
# ReductionStep.clean(); a backend may narrow them (a cluster with smaller nodes).
RESOURCE_LIMITS: dict[str, tuple[type[int] | type[float], float, float]] = {
    "cpu": (int, 1, 1024),
    "memory_gb": (float, 1e-9, 65536),
    "time_hours": (float, 1 / 60, 720),
}


class BackendError(Exception):
    """A backend could not do what was asked (submit, cancel, read logs). The message names the
    job and the cause; callers treat it as retryable unless they know better."""


@dataclass(frozen=True)
class JobSpec:
    """One job to run. ``command`` is the complete argv (container runtime prefix included,
    see ``pipelines.containers.build_command``); ``env`` is added to the backend's base
    environment; the backend writes its own files (status, stdout, stderr) under
    ``run_dir / "logs"``."""

    name: str
    command: list[str]
    run_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"job name {self.name!r}: use letters, digits, '-', '_' and '.'")
        if not self.command:
            raise ValueError(f"job {self.name}: empty command")
        # A number in argv or env would only fail later, inside the spawn, far from its cause.
        bad = [repr(a) for a in self.command if not isinstance(a, str)]
        bad += [f"{k}={v!r}" for k, v in self.env.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"job {self.name}: command and env must be strings: {', '.join(bad)}")


@dataclass(frozen=True)
class JobStatus:
    """What a backend knows about one job. ``exit_code`` is set once the job ended on its own
    (None for a lost or cancelled job); ``reason`` says why a job failed in words ("exit code
    3", "cancelled", "lost: ..."); metrics are None when the backend does not measure them."""

    job_id: str
    state: JobState
    exit_code: int | None = None
    reason: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.state not in JOB_STATES:
            raise ValueError(f"job state {self.state!r} is not one of {', '.join(JOB_STATES)}")

    @property
    def is_finished(self) -> bool:
        return self.state in ("completed", "failed")


class Backend(ABC):
    """Runs jobs. Every method is safe to call from several workers at once and again after a
    crash: state lives with the job (files, the scheduler), never in this object."""

    name: str = ""

    @abstractmethod
    def submit(self, spec: JobSpec) -> str:
        """Start the job and return its id. Idempotent by ``spec.name``: when a job of that name
        already exists for ``spec.run_dir`` its id is returned and nothing is started. Raises
        ValidationError for resources the backend refuses (``validate_resources``; nothing is
        started, and a retry will not help) and BackendError when the job cannot be started."""

    @abstractmethod
    def find(self, spec: JobSpec) -> str | None:
        """The id of the job already submitted under ``spec.name``, or None."""

    @abstractmethod
    def get_status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Status of every id in one batch call, keyed by id (every id given is in the answer;
        an id the backend does not know is ``failed`` with reason "unknown job ...")."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop the job; a job that already ended is left as it is. Raises BackendError when the
        job is unknown or could not be stopped."""

    @abstractmethod
    def get_logs(self, job_id: str, *, tail_bytes: int = 65536) -> str:
        """The last ``tail_bytes`` of the job's stdout and of its stderr, labelled. Raises
        BackendError for an unknown job."""

    def validate_resources(self, resources: dict[str, Any]) -> None:
        """Raise ValidationError naming the key when ``resources`` asks for something unknown,
        of the wrong type or out of range. Backends narrow the limits by overriding."""
        validate_resource_shape(resources)


# What a job (or the submitting command) inherits from the worker's environment: enough to find
# programs, a home, the locale, a virtualenv and container runtimes; never the worker's database
# URL, broker password or cloud keys. Each backend adds the names it needs; JobSpec.env comes on
# top.
INHERITED_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "VIRTUAL_ENV",
        "PYTHONPATH",
    }
)
INHERITED_ENV_PREFIXES = ("LC_", "APPTAINER_", "SINGULARITY_")


def inherited_environment(
    names: frozenset[str] = frozenset(), prefixes: tuple[str, ...] = ()
) -> dict[str, str]:
    """The worker's environment variables a job may see: ``INHERITED_ENV`` and ``names``, and
    those starting with ``INHERITED_ENV_PREFIXES`` or ``prefixes``."""
    allowed = INHERITED_ENV | names
    starts = INHERITED_ENV_PREFIXES + prefixes
    return {
        key: value for key, value in os.environ.items() if key in allowed or key.startswith(starts)
    }


def validate_resource_shape(resources: object) -> dict[str, Any]:
    """Check a resource request against RESOURCE_LIMITS; returns it unchanged. ``cpu`` must be
    an integer, the others numbers (booleans are refused: ``True`` is not one CPU)."""
    if not isinstance(resources, dict):
        raise ValidationError(
            f"resources must be an object like {{'cpu': 1, 'memory_gb': 1}}, got "
            f"{type(resources).__name__}"
        )
    unknown = sorted(set(resources) - set(RESOURCE_LIMITS))
    if unknown:
        raise ValidationError(
            f"unknown resource {', '.join(map(repr, unknown))}; known: {', '.join(RESOURCE_LIMITS)}"
        )
    for key, value in resources.items():
        kind, low, high = RESOURCE_LIMITS[key]
        allowed: tuple[type, ...] = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            expected = "an integer" if kind is int else "a number"
            raise ValidationError(f"resource {key!r} must be {expected}, got {value!r}")
        assert isinstance(value, int | float)
        if not low <= value <= high:
            shown_low = "more than 0" if key == "memory_gb" else f"{low:g}"
            raise ValidationError(
                f"resource {key!r} = {value!r} is out of range ({shown_low} .. {high:g})"
            )
    return resources


def job_done_callback_env(run_id: int) -> dict[str, str]:
    """The environment that makes a job push its completion: ``WORKFLOW_JOB_DONE_CALLBACK`` as
    JSON with this site's broker (URL and transport options), the task
    ``pipelines.tasks.run_job_finished``, its args ``[run_id]`` and the queue the router gives
    it. The workflow-manager adds it to ``JobSpec.env``; the job wrapper sends the task once the
    exit code is written, best effort, and keeps it out of the command's environment (the
    broker URL may hold a password)."""
    from django.conf import settings

    from pipelines.queues import route_task

    route = route_task(JOB_FINISHED_TASK, [run_id], {}, {}) or {}
    callback = {
        "broker_url": settings.CELERY_BROKER_URL,
        "transport_options": getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
        "task": JOB_FINISHED_TASK,
        "args": [run_id],
        "queue": route.get("queue", ""),
    }
    return {JOB_DONE_CALLBACK_ENV: json.dumps(callback, sort_keys=True)}


# Literal registry: backend name -> dotted path of its class (ARCHITECTURE.md rule 7). SLURM
# and Kubernetes arrive with the HPC issue.
BACKENDS: dict[str, str] = {
    "local": "pipelines.backends.local.LocalBackend",
    # HPC backends (issue 12, hpc backends)
    "slurm": "pipelines.backends.slurm.SlurmBackend",
    "kubernetes": "pipelines.backends.kubernetes.KubernetesBackend",
}


@cache
def _backend_class(name: str) -> type[Backend]:
    module_path, _, attribute = BACKENDS[name].rpartition(".")
    cls: type[Backend] = getattr(import_module(module_path), attribute)
    return cls


def get_backend(name: str | None = None) -> Backend:
    """A new instance of the backend ``name`` (default ``settings.HPC_BACKEND``, else
    ``local``). Instances hold no job state, so a new one reads what an old one submitted.
    Raises ImproperlyConfigured naming the known backends for an unknown name."""
    if name is None:
        from django.conf import settings

        name = getattr(settings, "HPC_BACKEND", "local") or "local"
    if name not in BACKENDS:
        raise ImproperlyConfigured(
            f"unknown HPC backend {name!r}; known: {', '.join(sorted(BACKENDS))}"
        )
    return _backend_class(name)()


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing or not (yet) an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return value if isinstance(value, dict) else None
