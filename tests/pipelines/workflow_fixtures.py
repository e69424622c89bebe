"""A scripted HPC backend and a small staged world for the workflow and result manager tests.

``FakeBackend`` keeps its jobs in class attributes (``get_backend`` makes a new instance per
call, as with the real backends, so state must outlive instances) and records every call, so a
test can count submissions and cancels. ``world()`` builds a processing location on disk with
archived packages whose raw files are STAGED there (real bytes, real checksums) and a completed
StagingJob covering them, the state the workflow manager finds after staging.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pipelines.backends.base import BACKENDS, Backend, BackendError, JobSpec, JobStatus
from pipelines.models import (
    DataLocation,
    ExecutedReductionStep,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataPackage,
    ReductionStep,
    StagingJob,
    Status,
)
from tests.factories import (
    DataLocationFactory,
    ExecutedObsUnitFactory,
    ExecutedReductionStepFactory,
    PhysicalCopyFactory,
    PipelineFactory,
    RawDataFileFactory,
    RawDataPackageFactory,
    ReductionSoftwareVersionFactory,
    ReductionStepConfigFactory,
    ReductionStepFactory,
    StagingJobFactory,
)


class FakeBackend(Backend):
    """Jobs that run only when a test says so (``finish``)."""

    name = "fake"
    jobs: ClassVar[dict[str, dict[str, Any]]] = {}
    submits: ClassVar[list[str]] = []
    status_calls: ClassVar[list[list[str]]] = []
    cancels: ClassVar[list[str]] = []
    cancel_error: ClassVar[Exception | None] = None

    @classmethod
    def reset(cls) -> None:
        cls.jobs = {}
        cls.submits = []
        cls.status_calls = []
        cls.cancels = []
        cls.cancel_error = None

    def submit(self, spec: JobSpec) -> str:
        existing = self.find(spec)
        if existing is not None:
            return existing
        job_id = f"fake:{spec.name}"
        self.jobs[job_id] = {"spec": spec, "status": JobStatus(job_id, "pending")}
        self.submits.append(job_id)
        return job_id

    def find(self, spec: JobSpec) -> str | None:
        job_id = f"fake:{spec.name}"
        return job_id if job_id in self.jobs else None

    def get_status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        self.status_calls.append(list(job_ids))
        return {
            job_id: self.jobs[job_id]["status"]
            if job_id in self.jobs
            else JobStatus(job_id, "failed", reason=f"unknown job {job_id}")
            for job_id in job_ids
        }

    def cancel(self, job_id: str) -> None:
        self.cancels.append(job_id)
        if self.cancel_error is not None:
            raise self.cancel_error

    def get_logs(self, job_id: str, *, tail_bytes: int = 65536) -> str:
        if job_id not in self.jobs:
            raise BackendError(f"unknown job {job_id}")
        return f"[stderr] the log of {job_id}"

    @classmethod
    def set_state(cls, job_id: str, state: str, **values: Any) -> None:
        cls.jobs[job_id]["status"] = JobStatus(job_id, state, **values)  # type: ignore[arg-type]

    @classmethod
    def finish(
        cls,
        job_id: str,
        *,
        outputs: dict[str, bytes] | None = None,
        exit_code: int = 0,
        state: str = "completed",
        **metrics: Any,
    ) -> Path:
        """End the job: write ``outputs`` (paths below the attempt directory) and report it
        ``state`` with ``exit_code`` and metrics. Returns the attempt directory."""
        spec: JobSpec = cls.jobs[job_id]["spec"]
        for relative, data in (outputs or {}).items():
            path = Path(spec.run_dir) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        now = datetime.now(UTC)
        defaults = {"wall_seconds": 12.5, "cpu_seconds": 7200.0, "peak_memory_bytes": 2 * 1024**3}
        cls.set_state(
            job_id,
            state,
            exit_code=exit_code,
            started_at=now,
            finished_at=now,
            reason="" if state == "completed" else f"exit code {exit_code}",
            **{**defaults, **metrics},
        )
        return Path(spec.run_dir)


@pytest.fixture
def fake_backend(settings: Any, monkeypatch: pytest.MonkeyPatch) -> type[FakeBackend]:
    monkeypatch.setitem(BACKENDS, "fake", "tests.pipelines.workflow_fixtures.FakeBackend")
    settings.HPC_BACKEND = "fake"
    settings.CONTAINER_RUNTIME = "none"
    FakeBackend.reset()
    return FakeBackend


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class World:
    root: Path
    location: DataLocation
    step: ReductionStep
    packages: list[RawDataPackage]
    staging_job: StagingJob
    files: dict[str, bytes] = field(default_factory=dict)

    def run(self, step: ReductionStep | None = None, **values: Any) -> ExecutedReductionStep:
        """A run of ``step`` (default the world's step) over all the world's packages."""
        step = step or self.step
        values.setdefault("max_retries", step.max_retries)
        run = ExecutedReductionStepFactory(reduction_step=step, **values)
        run.input_raw_packages.set(self.packages)
        return run


def world(tmp_path: Path, *, packages: int = 2, files_per_package: int = 2) -> World:
    """A processing location under ``tmp_path`` with ``packages`` archived packages of one scan,
    their files staged there (bytes on disk, STAGED verified copies) by a completed StagingJob,
    and a pipeline with one step "calibrate" (config calibration_mode hot_cold)."""
    root = tmp_path / "processing"
    root.mkdir(parents=True, exist_ok=True)
    location = DataLocationFactory(
        location_type=DataLocation.LocationType.PROCESSING, root_path=str(root)
    )
    version = ReductionSoftwareVersionFactory(command=["python3", "-S", "-c", "pass"])
    pipeline = PipelineFactory(processing_location=location)
    step = ReductionStepFactory(
        pipeline=pipeline,
        name="calibrate",
        software=version.software,
        software_version=version,
        config=ReductionStepConfigFactory(),
        max_retries=2,
    )
    scan = ExecutedObsUnitFactory()
    made: list[RawDataPackage] = []
    contents: dict[str, bytes] = {}
    for _ in range(packages):
        package = RawDataPackageFactory(
            executed_obs_unit=scan, state="archived", status=Status.COMPLETED
        )
        for f in range(files_per_package):
            relative = f"raw/{package.name}/file_{f}.dat"
            data = f"{package.name}:{f}".encode() * 100
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(data)
            raw_file = RawDataFileFactory(
                raw_data_package=package,
                executed_obs_unit=scan,
                instrument_module=package.instrument_module,
                relative_path=relative,
                size=len(data),
                checksum=sha256(data),
            )
            PhysicalCopyFactory(
                kind=PhysicalCopy.Kind.RAW_DATA_FILE,
                raw_data_file=raw_file,
                raw_data_package=None,
                location=location,
                relative_path=relative,
                status=PhysicalCopyStatus.STAGED,
                integrity=PhysicalCopy.Integrity.VERIFIED,
            )
            contents[relative] = data
        made.append(package)
    job = StagingJobFactory(destination_location=location, status=Status.COMPLETED)
    job.raw_data_packages.set(made)
    return World(root, location, step, made, job, contents)
