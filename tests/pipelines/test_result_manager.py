"""The result manager (behaviours 32-40, 43): poll, collect, register, retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.models import (
    DataProduct,
    ExecutedReductionStep,
    PhysicalCopy,
    ReductionStep,
    RunStatus,
    StagingJob,
    StateEvent,
)
from pipelines.services.results import (
    product_raw_packages,
    result_manager_tick,
    run_collect,
    runs_reclaim_collection,
)
from pipelines.services.runs import run_submit, workflow_manager_tick
from tests.factories import ReductionStepFactory

from .workflow_fixtures import FakeBackend, World, fake_backend, world

__all__ = ["fake_backend"]  # a fixture, used by name

pytestmark = pytest.mark.django_db

OUTPUTS = {
    "output/science/map.csv": b"science",
    "output/qa/metrics.json": b'{"rms": 0.5}',
    "output/plots/map.png": b"png",
    "output/statistics/summary.json": b"{}",
    "output/logs/reduction.log": b"log",
}


def submitted(w: World, **values: object) -> ExecutedReductionStep:
    run = w.run(**values)
    workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    return run_submit(run.pk, token=run.claim_token, owner="w")


def collect(run: ExecutedReductionStep) -> ExecutedReductionStep:
    """What the dispatched collection task does, with the token the tick gave it."""
    run.refresh_from_db()
    return run_collect(run.pk, token=run.claim_token, owner="collector")


def test_behaviour_32_a_running_job_moves_a_submitted_run_to_running(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    run = submitted(world(tmp_path))
    result_manager_tick(owner="rm")
    run.refresh_from_db()
    assert run.status == RunStatus.SUBMITTED  # still pending at the backend

    FakeBackend.set_state(run.hpc_job_id, "running")
    assert result_manager_tick(owner="rm")["running"] == 1
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.started_at is not None


def test_behaviour_33_completed_goes_through_collecting_to_completed_and_failed_to_failed(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    good, bad = submitted(w, sub_group_key="good"), submitted(w, sub_group_key="bad")
    FakeBackend.set_state(good.hpc_job_id, "running")
    FakeBackend.set_state(bad.hpc_job_id, "running")
    result_manager_tick(owner="rm")

    FakeBackend.finish(good.hpc_job_id, outputs=OUTPUTS)
    FakeBackend.finish(bad.hpc_job_id, state="failed", exit_code=2)
    counts = result_manager_tick(owner="rm")
    assert (counts["collecting_results"], counts["failed"]) == (1, 1)
    good.refresh_from_db()
    bad.refresh_from_db()
    assert good.status == RunStatus.COLLECTING_RESULTS and good.claim_token
    # FAILED, then (retries left) back to PENDING in the same tick; the attempt keeps its end.
    moves = list(
        StateEvent.objects.filter(entity="executed_reduction_step", object_id=str(bad.pk))
        .order_by("pk")
        .values_list("from_state", "to_state")
    )
    assert moves[-2:] == [("running", "failed"), ("failed", "pending")]
    assert bad.attempts[-1]["exit_code"] == 2
    assert "exit code 2" in bad.failure_reason and "the log of" in bad.failure_reason

    assert collect(good).status == RunStatus.COMPLETED


def test_behaviour_34_output_subdirectories_give_the_product_types(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    run = submitted(world(tmp_path))
    FakeBackend.finish(
        run.hpc_job_id,
        outputs={**OUTPUTS, "workspace/calibrate/partial.npy": b"x", "output/stray.txt": b"?"},
    )
    result_manager_tick(owner="rm")
    collect(run)

    types = dict(run.products.values_list("relative_path", "product_type"))
    assert types == {
        "output/science/map.csv": "science",
        "output/qa/metrics.json": "qa_metric",
        "output/plots/map.png": "plot",
        "output/statistics/summary.json": "statistics",
        "output/logs/reduction.log": "log",
        "workspace/calibrate/partial.npy": "intermediate",
    }


def test_behaviour_35_products_have_checksums_a_producer_and_lineage_to_the_raw_packages(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    combine = ReductionStepFactory(pipeline=w.step.pipeline, name="combine",
                                   software=w.step.software, group_by=["source"])  # fmt: skip
    combine.depends_on.set([w.step])
    upstream = submitted(w, sub_group_key="scan")
    FakeBackend.finish(upstream.hpc_job_id, outputs={"workspace/calibrate/science/s.csv": b"1"})
    result_manager_tick(owner="rm")
    collect(upstream)
    [intermediate] = upstream.products.all()

    downstream = w.run(step=combine, sub_group_key="source")
    downstream.input_raw_packages.set([])  # combine reads only upstream products here
    downstream.input_products.set([intermediate])
    workflow_manager_tick(owner="wm")
    downstream.refresh_from_db()
    downstream = run_submit(downstream.pk, token=downstream.claim_token, owner="w")
    FakeBackend.finish(downstream.hpc_job_id, outputs={"output/science/combined.csv": b"2"})
    result_manager_tick(owner="rm")
    collect(downstream)

    [final] = downstream.products.filter(product_type="science")
    assert final.produced_by == downstream
    assert final.checksum == __import__("hashlib").sha256(b"2").hexdigest()
    copy = PhysicalCopy.objects.get(data_product=final)
    assert copy.location == w.location and copy.integrity == PhysicalCopy.Integrity.VERIFIED
    assert (w.root / copy.relative_path).read_bytes() == b"2"
    assert set(product_raw_packages(final)) == set(w.packages)
    assert set(product_raw_packages(intermediate)) == set(w.packages)


def test_behaviour_36_a_completed_run_holds_the_job_metrics(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    run = submitted(world(tmp_path))
    FakeBackend.finish(run.hpc_job_id, outputs=OUTPUTS, wall_seconds=90.0, cpu_seconds=1800.0,
                       peak_memory_bytes=3 * 1024**3)  # fmt: skip
    result_manager_tick(owner="rm")
    run = collect(run)
    run.refresh_from_db()
    assert (run.exit_code, run.wall_time_seconds, run.cpu_hours, run.peak_memory_gb) == (
        0, 90.0, 0.5, 3.0,
    )  # fmt: skip
    assert run.attempts[-1]["outcome"] == "completed"
    assert DataProduct.objects.get(produced_by=run, product_type="qa_metric").quality_metrics == {
        "rms": 0.5
    }


def test_behaviour_37_an_error_while_collecting_leaves_the_run_failed(
    tmp_path: Path, fake_backend: type[FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.services import results
    from pipelines.tasks import collect_run_results

    run = submitted(world(tmp_path))
    FakeBackend.finish(run.hpc_job_id, outputs=OUTPUTS)
    result_manager_tick(owner="rm")
    run.refresh_from_db()

    def unreadable(path: Path, algorithm: str) -> tuple[str, int]:
        raise PermissionError(f"cannot read {path}")

    monkeypatch.setattr(results, "checksum_and_size", unreadable)
    result = collect_run_results(run.pk, claim_token=run.claim_token)
    run.refresh_from_db()
    assert result["done"] is False
    assert run.status == RunStatus.FAILED and "PermissionError" in run.failure_reason
    assert not run.products.exists()


def test_behaviour_38_a_failed_run_with_retries_left_goes_back_to_pending(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    run = submitted(world(tmp_path))
    first_dir = Path(run.run_dir)
    FakeBackend.finish(run.hpc_job_id, state="failed", exit_code=1)
    counts = result_manager_tick(owner="rm")
    assert counts["failed"] == 1
    # The same tick (or the next) retries it.
    counts = result_manager_tick(owner="rm") if not counts["retried"] else counts
    run.refresh_from_db()
    assert run.status == RunStatus.PENDING and run.retry_count == 1
    assert run.hpc_job_id == "" and run.attempts[0]["outcome"] == "failed"

    workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    run = run_submit(run.pk, token=run.claim_token, owner="w")
    assert run.hpc_job_id == f"fake:run-{run.pk}-2"
    assert Path(run.run_dir) != first_dir and Path(run.run_dir).name == f"{run.pk}-2"


def test_behaviour_39_a_failed_run_without_retries_left_stays_failed(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    run = submitted(w, max_retries=0)
    FakeBackend.finish(run.hpc_job_id, state="failed", exit_code=1)
    for _ in range(3):
        result_manager_tick(owner="rm")
        workflow_manager_tick(owner="wm")
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED and run.failed_for_good and run.retry_count == 0
    assert run.log_path.endswith("/logs")
    # Failed for good: its staging job is let go.
    assert not StagingJob.objects.get(pk=run.staging_job_id).active


def test_behaviour_40_only_submitted_and_running_runs_are_polled(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    other = ReductionStepFactory(pipeline=w.step.pipeline, software=w.step.software)
    live = submitted(w, sub_group_key="live")
    for status in (RunStatus.PENDING, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
        w.run(step=other, status=status, sub_group_key=f"s-{status}", hpc_job_id=f"job-{status}",
              failed_for_good=True)  # fmt: skip
    staging = w.run(step=other, status=RunStatus.STAGING_DATA, sub_group_key="staging",
                    hpc_job_id="job-staging")  # fmt: skip

    result_manager_tick(owner="rm")
    assert FakeBackend.status_calls == [[live.hpc_job_id]]  # one call for the batch
    staging.refresh_from_db()
    assert staging.status == RunStatus.STAGING_DATA


def test_behaviour_43_completed_and_cancelled_runs_are_never_moved_by_a_manager(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    done = submitted(w, sub_group_key="done")
    FakeBackend.finish(done.hpc_job_id, outputs=OUTPUTS)
    result_manager_tick(owner="rm")
    collect(done)
    cancelled = w.run(sub_group_key="x", status=RunStatus.CANCELLED, hpc_job_id="fake:gone")
    for _ in range(2):
        workflow_manager_tick(owner="wm")
        result_manager_tick(owner="rm")
    done.refresh_from_db()
    cancelled.refresh_from_db()
    assert (done.status, cancelled.status) == (RunStatus.COMPLETED, RunStatus.CANCELLED)


def test_a_collection_whose_worker_died_is_claimed_again_and_registered_once(
    tmp_path: Path, fake_backend: type[FakeBackend], settings: object
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    run = submitted(world(tmp_path))
    FakeBackend.finish(run.hpc_job_id, outputs=OUTPUTS)
    result_manager_tick(owner="rm")
    run.refresh_from_db()
    dead_token = run.claim_token
    ExecutedReductionStep.objects.filter(pk=run.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    assert runs_reclaim_collection(owner="rm") == 1
    assert runs_reclaim_collection(owner="rm") == 0
    run.refresh_from_db()
    assert run.claim_token != dead_token
    collect(run)
    with pytest.raises(Exception, match="claim"):
        run_collect(run.pk, token=dead_token, owner="late")
    assert run.products.count() == DataProduct.objects.filter(produced_by=run).count() == 5


def _finished_run_with_a_downstream_step(
    tmp_path: Path,
) -> tuple[ExecutedReductionStep, ReductionStep]:
    """A per-scan calibrate run whose job just finished, and a combine step depending on it."""
    from pipelines.grouping import sub_group_key

    w = world(tmp_path)
    combine = ReductionStepFactory(pipeline=w.step.pipeline, name="combine", group_by=[],
                                   software=w.step.software,
                                   software_version=w.step.software_version)  # fmt: skip
    combine.depends_on.set([w.step])
    scan = w.packages[0].executed_obs_unit_id
    run = submitted(
        w, sub_group_key=sub_group_key(["executed_obs_unit"], {"executed_obs_unit": scan})
    )
    FakeBackend.finish(run.hpc_job_id, outputs={"workspace/calibrate/science/s.csv": b"1"})
    return run, combine


def test_a_pushed_job_end_collects_the_run_at_once_and_starts_its_downstream_step(
    tmp_path: Path,
    fake_backend: type[FakeBackend],
    django_capture_on_commit_callbacks,  # type: ignore[no-untyped-def]
) -> None:
    from pipelines.tasks import run_job_finished

    run, combine = _finished_run_with_a_downstream_step(tmp_path)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert run_job_finished(run.pk) == {"id": run.pk, "done": True, "status": "completed"}
    # The task evaluated the downstream step itself: it queues no second evaluation.
    assert not [c for c in callbacks if "evaluation" in getattr(c, "__name__", repr(c))]
    [downstream] = ExecutedReductionStep.objects.filter(reduction_step=combine)
    assert set(downstream.input_products.all()) == set(run.products.all())
    # Claimed and handed to a submitter in the same task, not at the next tick.
    assert downstream.status == RunStatus.STAGING_DATA
    assert downstream.idempotency_key == f"submit:run-{downstream.pk}-1"
    # A repeated push is harmless.
    assert run_job_finished(run.pk)["done"] is False


def test_the_polled_collection_task_starts_the_downstream_step_itself(
    tmp_path: Path,
    fake_backend: type[FakeBackend],
    django_capture_on_commit_callbacks,  # type: ignore[no-untyped-def]
) -> None:
    from pipelines.tasks import collect_run_results

    run, combine = _finished_run_with_a_downstream_step(tmp_path)
    result_manager_tick(owner="rm")  # polls the job, claims the collection
    run.refresh_from_db()
    assert run.status == RunStatus.COLLECTING_RESULTS

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert collect_run_results(run.pk, claim_token=run.claim_token)["done"] is True
    assert not [c for c in callbacks if "evaluation" in getattr(c, "__name__", repr(c))]
    [downstream] = ExecutedReductionStep.objects.filter(reduction_step=combine)
    assert set(downstream.input_products.all()) == set(run.products.all())
    assert downstream.status == RunStatus.STAGING_DATA


def test_a_finished_run_releases_its_staging_job_only_once_no_other_live_run_uses_it(
    tmp_path: Path, fake_backend: type[FakeBackend]
) -> None:
    w = world(tmp_path)
    first, second = submitted(w, sub_group_key="a"), submitted(w, sub_group_key="b")
    assert first.staging_job_id == second.staging_job_id == w.staging_job.pk
    FakeBackend.finish(first.hpc_job_id, outputs=OUTPUTS)
    result_manager_tick(owner="rm")
    collect(first)
    assert StagingJob.objects.get(pk=w.staging_job.pk).active  # the second still needs it

    FakeBackend.finish(second.hpc_job_id, outputs=OUTPUTS)
    result_manager_tick(owner="rm")
    collect(second)
    assert not StagingJob.objects.get(pk=w.staging_job.pk).active
