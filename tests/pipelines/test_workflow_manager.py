"""The workflow manager (behaviours 24-27, 31, 48, 50): claim, stage, verify, submit."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from pipelines.backends.base import JobSpec
from pipelines.models import (
    ExecutedReductionStep,
    PhysicalCopy,
    ReductionStep,
    RunStatus,
    StagingJob,
    Status,
)
from pipelines.queues import route_task
from pipelines.services.operations import ClaimLost
from pipelines.services.results import result_manager_tick, run_collect
from pipelines.services.runs import (
    CorruptInput,
    run_submit,
    runs_waiting_for_staging,
    workflow_manager_tick,
)
from tests.factories import ReductionStepConfigFactory, ReductionStepFactory

from .workflow_fixtures import FakeBackend, fake_backend, sha256, world

__all__ = ["fake_backend"]  # a fixture, used by name

pytestmark = pytest.mark.django_db


def claimed(run: ExecutedReductionStep) -> ExecutedReductionStep:
    run.refresh_from_db()
    return run


def submit(run: ExecutedReductionStep) -> ExecutedReductionStep:
    """The submission task's service, with the token the tick handed over."""
    run.refresh_from_db()
    return run_submit(run.pk, token=run.claim_token, owner="test-worker")


def test_behaviour_24_only_pending_runs_are_picked_up_and_move_to_staging_data(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    pending = w.run()
    other_step = ReductionStepFactory(pipeline=w.step.pipeline, software=w.step.software)
    others = {
        status: w.run(step=other_step, status=status, sub_group_key=f"k-{status}")
        for status in (RunStatus.SUBMITTED, RunStatus.RUNNING, RunStatus.COMPLETED,
                       RunStatus.CANCELLED)
    }  # fmt: skip

    counts = workflow_manager_tick(owner="wm")

    assert counts["claimed"] == 1
    pending.refresh_from_db()
    assert pending.status == RunStatus.STAGING_DATA
    assert pending.claim_token and pending.lease_expires_at is not None
    for status, run in others.items():
        run.refresh_from_db()
        assert run.status == status
    # A second tick claims nothing more.
    assert workflow_manager_tick(owner="wm2")["claimed"] == 0


def test_behaviour_25_staging_job_command_and_manifest_are_made_during_staging_data(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    # The world's job covers the packages; were it completed, the run would reuse it. It
    # failed, so a new one is created.
    StagingJob.objects.filter(pk=w.staging_job.pk).update(status=Status.FAILED)
    run = w.run()

    counts = workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    assert counts["staging_created"] == 1 and counts["waiting"] == 1
    job = run.staging_job
    assert job is not None and job.pk != w.staging_job.pk
    assert set(job.raw_data_packages.all()) == set(w.packages)
    # ... and dispatched to the staging queue at once, not at the staging manager's next tick.
    assert job.destination_location == w.location and job.status == Status.SCHEDULED
    lease = run.lease_expires_at

    # While the job is pending the tick keeps the run's lease alive and submits nothing.
    counts = workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    assert counts["waiting"] == 1 and counts["dispatched"] == 0
    assert run.status == RunStatus.STAGING_DATA and run.lease_expires_at >= lease

    # The job completes: the run is handed to one submitter, which builds the command and
    # writes the manifest under config/.
    StagingJob.objects.filter(pk=job.pk).update(status=Status.COMPLETED)
    assert runs_waiting_for_staging(job.pk)  # the staging task queues a workflow tick
    assert workflow_manager_tick(owner="wm")["dispatched"] == 1
    assert not runs_waiting_for_staging(job.pk)
    assert workflow_manager_tick(owner="wm")["dispatched"] == 0
    run = submit(run)
    spec = FakeBackend.jobs[run.hpc_job_id]["spec"]
    assert spec.command == ["python3", "-S", "-c", "pass"]
    assert spec.env["WORKFLOW_OUTPUT_DIR"].endswith("/output/")  # the only step: final
    manifest = Path(run.run_dir) / "config" / "manifest.json"
    assert json.loads(manifest.read_text())["run_id"] == run.pk


def test_behaviour_26_a_submitted_run_holds_the_job_id_the_backend_returned(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    run = w.run()
    workflow_manager_tick(owner="wm")
    run = submit(run)

    assert run.status == RunStatus.SUBMITTED
    assert FakeBackend.submits == [run.hpc_job_id] == [f"fake:run-{run.pk}-1"]
    assert run.submitted_at is not None and run.claim_token == "" and run.lease_expires_at is None


def test_behaviour_27_each_attempt_gets_its_directories_inside_the_processing_root(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    run = w.run(sub_group_key="executed_obs_unit=42")
    workflow_manager_tick(owner="wm")
    run = submit(run)

    attempt = (
        w.root / "pipelines" / str(w.step.pipeline_id) / "executed_obs_unit=42" / f"{run.pk}-1"
    )
    assert Path(run.run_dir) == attempt
    for sub in (
        "input",
        "config",
        "workspace",
        "output",
        "logs",
        "workspace/calibrate",
        "output/science",
        "output/qa",
        "output/plots",
        "output/statistics",
        "output/logs",
    ):
        assert (attempt / sub).is_dir(), sub
    # The staged inputs are in input/, byte for byte.
    for relative, data in w.files.items():
        assert (attempt / "input" / relative).read_bytes() == data


def _finished_upstream_and_combine(
    w: Any, **combine: Any
) -> tuple[ExecutedReductionStep, ReductionStep]:
    """A completed calibrate run with one product (``spectrum.csv``, "1,2,3"), and a combine
    step per source depending on it (``combine``: more of its fields)."""
    combine_step = ReductionStepFactory(
        pipeline=w.step.pipeline, name="combine", software=w.step.software,
        software_version=w.step.software_version, group_by=["source"], **combine,
    )  # fmt: skip
    combine_step.depends_on.set([w.step])
    upstream_run = w.run(sub_group_key="scan")
    workflow_manager_tick(owner="wm")
    upstream_run = submit(upstream_run)
    FakeBackend.finish(
        upstream_run.hpc_job_id,
        outputs={"workspace/calibrate/science/spectrum.csv": b"1,2,3\n"},
    )
    result_manager_tick(owner="rm")
    upstream_run.refresh_from_db()
    run_collect(upstream_run.pk, token=upstream_run.claim_token, owner="collector")
    upstream_run.refresh_from_db()
    return upstream_run, combine_step


def test_behaviour_31_the_manifest_holds_parameters_staged_inputs_and_upstream_products(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    upstream_run, combine = _finished_upstream_and_combine(
        w, config=ReductionStepConfigFactory(parameters={"weighting": "inverse_variance"})
    )
    assert upstream_run.status == RunStatus.COMPLETED
    [product] = upstream_run.products.filter(product_type="intermediate")

    downstream = w.run(step=combine, sub_group_key="source=M83")
    downstream.input_products.set([product])
    workflow_manager_tick(owner="wm")
    downstream = submit(downstream)

    manifest = json.loads((Path(downstream.run_dir) / "config/manifest.json").read_text())
    assert manifest["parameters"] == {"weighting": "inverse_variance"}
    assert manifest["step"] == "combine" and manifest["is_final_step"] is True
    assert sorted(i["path"] for i in manifest["inputs"]) == sorted(w.files)
    assert all(i["checksum"] == sha256(w.files[i["path"]]) for i in manifest["inputs"])
    [entry] = manifest["upstream_products"]
    assert (entry["product_id"], entry["checksum"]) == (product.pk, product.checksum)
    assert (Path(downstream.run_dir) / "input" / entry["path"]).read_bytes() == b"1,2,3\n"
    # The upstream manifest carried the step's configuration parameters.
    upstream_manifest = json.loads(
        (Path(upstream_run.run_dir) / "config/manifest.json").read_text()
    )
    assert upstream_manifest["parameters"]["calibration_mode"] == "hot_cold"
    assert upstream_manifest["is_final_step"] is False
    assert (
        FakeBackend.jobs[upstream_run.hpc_job_id]["spec"]
        .env["WORKFLOW_OUTPUT_DIR"]
        .endswith("/workspace/calibrate/")
    )


def test_a_released_staging_job_whose_files_are_still_staged_is_reused(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    StagingJob.objects.filter(pk=w.staging_job.pk).update(active=False)
    run = w.run()
    counts = workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    assert (counts["staging_created"], counts["dispatched"]) == (0, 1)
    assert run.staging_job_id == w.staging_job.pk
    assert StagingJob.objects.get(pk=w.staging_job.pk).active


def test_a_corrupted_staged_input_fails_the_run_without_submitting_and_marks_the_copy(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    relative = sorted(w.files)[0]
    (w.root / relative).write_bytes(b"flipped" + w.files[relative][7:])
    run = w.run()
    workflow_manager_tick(owner="wm")
    run.refresh_from_db()

    with pytest.raises(CorruptInput, match="hashes to"):
        run_submit(run.pk, token=run.claim_token, owner="w")
    assert FakeBackend.submits == []
    copy = PhysicalCopy.objects.get(raw_data_file__relative_path=relative)
    assert copy.integrity == PhysicalCopy.Integrity.MISMATCH


def test_a_staging_job_that_failed_for_good_fails_the_run(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    StagingJob.objects.filter(pk=w.staging_job.pk).update(
        status=Status.FAILED, failure_error_message="no archive holds a copy"
    )
    run = w.run()
    workflow_manager_tick(owner="wm")  # links a new job (the failed one is not reusable)
    run.refresh_from_db()
    StagingJob.objects.filter(pk=run.staging_job_id).update(
        status=Status.FAILED, failure_error_message="archive offline"
    )

    assert workflow_manager_tick(owner="wm")["failed"] == 1
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert "archive offline" in run.failure_reason and not run.failed_for_good


def test_a_submit_task_whose_claim_moved_on_does_nothing(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    run = w.run()
    workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    with pytest.raises(ClaimLost):
        run_submit(run.pk, token="an-old-claim", owner="w")
    assert FakeBackend.submits == []


def test_a_resubmission_after_a_lost_commit_finds_the_job_by_name(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    run = w.run()
    workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    # An earlier worker's submit reached the backend, and it died before committing.
    first = FakeBackend().submit(
        JobSpec(name=f"run-{run.pk}-1", command=["true"], run_dir=tmp_path / "elsewhere")
    )

    run = run_submit(run.pk, token=run.claim_token, owner="w")
    assert run.hpc_job_id == first and FakeBackend.submits == [first]


def test_behaviour_48_an_error_on_one_run_is_logged_and_the_others_go_on(
    tmp_path: Path, fake_backend: type[FakeBackend], caplog: Any, monkeypatch: Any
) -> None:
    w = world(tmp_path)
    broken, fine = w.run(sub_group_key="a"), w.run(sub_group_key="b")
    workflow_manager_tick(owner="wm")
    broken, fine = submit(broken), submit(fine)
    original = FakeBackend.get_status

    def status(self: FakeBackend, job_ids: list[str]) -> Any:
        answer = original(self, job_ids)
        answer[broken.hpc_job_id] = "not a status"  # applying it raises
        return answer

    monkeypatch.setattr(FakeBackend, "get_status", status)
    FakeBackend.set_state(fine.hpc_job_id, "running")
    with caplog.at_level(logging.ERROR):
        result_manager_tick(owner="rm")
    fine.refresh_from_db()
    broken.refresh_from_db()
    assert fine.status == RunStatus.RUNNING
    assert broken.status == RunStatus.SUBMITTED
    assert f"run {broken.pk} could not be updated" in caplog.text


WORKFLOW_TASKS = (
    "pipelines.tasks.run_trigger_manager",
    "pipelines.tasks.run_workflow_manager",
    "pipelines.tasks.run_result_manager",
    "pipelines.tasks.evaluate_triggers_now",
    "pipelines.tasks.submit_run",
    "pipelines.tasks.collect_run_results",
    "pipelines.tasks.run_job_finished",
)


def test_behaviour_50_every_workflow_task_routes_to_a_workflow_queue() -> None:
    from workflow_site.celery import app

    app.loader.import_default_modules()
    for name in WORKFLOW_TASKS:
        assert name in app.tasks, name
        queue = route_task(name, [], {}, {})["queue"]
        assert queue.startswith("workflow.") and not queue.startswith("transfer."), (name, queue)
    assert route_task("pipelines.tasks.submit_run", [], {}, {})["queue"] == "workflow.hpc"
    assert route_task("pipelines.tasks.collect_run_results", [], {}, {})["queue"] == (
        "workflow.results"
    )


def test_facility_run_is_not_idle_while_a_run_is_active_or_awaits_its_retry(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    from pipelines.runner import failed_operations, unfinished_operations

    w = world(tmp_path)
    assert "executed_reduction_step" not in unfinished_operations()
    run = w.run(status=RunStatus.RUNNING)
    assert unfinished_operations()["executed_reduction_step"] == 1
    ExecutedReductionStep.objects.filter(pk=run.pk).update(status=RunStatus.FAILED)
    assert unfinished_operations()["executed_reduction_step"] == 1  # its retry is still to come
    ExecutedReductionStep.objects.filter(pk=run.pk).update(failed_for_good=True)
    assert "executed_reduction_step" not in unfinished_operations()
    assert failed_operations()["executed_reduction_step"] == 1


def test_the_backend_and_runtime_settings_default_to_local_and_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    from django.core.exceptions import ImproperlyConfigured

    from pipelines.containers import RUNTIMES
    from workflow_site import settings as site_settings

    monkeypatch.delenv("HPC_BACKEND", raising=False)
    monkeypatch.delenv("CONTAINER_RUNTIME", raising=False)
    fresh = importlib.reload(site_settings)
    assert (fresh.HPC_BACKEND, fresh.CONTAINER_RUNTIME) == ("local", "none")
    monkeypatch.setenv("CONTAINER_RUNTIME", "apptainer")
    assert importlib.reload(site_settings).CONTAINER_RUNTIME == "apptainer"
    monkeypatch.setenv("CONTAINER_RUNTIME", "singularity")
    # The settings' literal choices are the containers' registry, in its order.
    with pytest.raises(ImproperlyConfigured, match=", ".join(RUNTIMES)):
        importlib.reload(site_settings)
    monkeypatch.delenv("CONTAINER_RUNTIME")
    importlib.reload(site_settings)


@pytest.mark.parametrize(
    ("broker", "pushed"), [("redis://127.0.0.1:6379/0", True), ("filesystem://", False)]
)
def test_the_job_pushes_its_end_except_through_the_file_system_broker(
    tmp_path: Path, fake_backend: type[FakeBackend], settings: Any, broker: str, pushed: bool
) -> None:
    settings.CELERY_BROKER_URL = broker
    w = world(tmp_path)
    run = w.run()
    workflow_manager_tick(owner="wm")
    run = submit(run)
    env = FakeBackend.jobs[run.hpc_job_id]["spec"].env
    assert ("WORKFLOW_JOB_DONE_CALLBACK" in env) is pushed
    if pushed:
        callback = json.loads(env["WORKFLOW_JOB_DONE_CALLBACK"])
        assert callback["task"] == "pipelines.tasks.run_job_finished"
        assert callback["args"] == [run.pk]
        assert callback["queue"] == "workflow.results"


def test_a_step_naming_an_instrument_gets_its_pinned_script_in_config(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    from pipelines.models import ReductionStep

    w = world(tmp_path)
    ReductionStep.objects.filter(pk=w.step.pk).update(reduction_instrument="chai")
    run = w.run()
    workflow_manager_tick(owner="wm")
    run = submit(run)

    assert run.parameter_set is not None and run.parameter_set.instrument == "chai"
    manifest = json.loads((Path(run.run_dir) / "config/manifest.json").read_text())
    script = manifest["reduction_script"]
    assert (script["instrument"], script["version"]) == ("chai", run.parameter_set.number)
    assert Path(script["path"]).read_text() == run.parameter_set.script_text
    assert script["checksum"] == run.parameter_set.script_checksum


def test_a_step_that_reads_only_upstream_products_stages_no_raw_data(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    upstream_run, combine = _finished_upstream_and_combine(w, stages_raw_data=False)
    assert upstream_run.status == RunStatus.COMPLETED
    [product] = upstream_run.products.all()
    jobs_before = StagingJob.objects.count()

    downstream = w.run(step=combine, sub_group_key="source=M83")
    downstream.input_products.set([product])
    counts = workflow_manager_tick(owner="wm")

    downstream.refresh_from_db()
    assert counts["staging_created"] == 0 and counts["dispatched"] == 1
    assert downstream.staging_job_id is None  # waits for no staging job, holds no raw copy
    assert StagingJob.objects.count() == jobs_before
    downstream = submit(downstream)
    assert downstream.status == RunStatus.SUBMITTED
    run_dir = Path(downstream.run_dir)
    manifest = json.loads((run_dir / "config/manifest.json").read_text())
    assert manifest["raw_data_staged"] is False and manifest["inputs"] == []
    # Lineage still names the sub-group's packages; the products are there, verified.
    assert manifest["raw_data_package_ids"] == sorted(p.pk for p in w.packages)
    [entry] = manifest["upstream_products"]
    assert (run_dir / "input" / entry["path"]).read_bytes() == b"1,2,3\n"
    assert not [p for p in (run_dir / "input").rglob("*") if p.is_file() and p.name in w.files]


def test_a_step_without_upstream_steps_stages_its_raw_data_whatever_its_flag(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    ReductionStep.objects.filter(pk=w.step.pk).update(stages_raw_data=False)
    run = w.run()
    workflow_manager_tick(owner="wm")
    run = submit(run)
    manifest = json.loads((Path(run.run_dir) / "config/manifest.json").read_text())
    assert manifest["raw_data_staged"] is True
    assert sorted(i["path"] for i in manifest["inputs"]) == sorted(w.files)
