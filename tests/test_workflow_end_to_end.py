"""The workflow engine end to end: simulated scans archived, the demo pipelines triggered, their
inputs staged, the demo reduction run on the local backend, and products registered whose
lineage leads back to the raw packages.

Twice: ``manage.py demo --no-serve`` on the laptop default (SQLite, file-system broker, the
embedded worker of ``facility run``), and real ``celery worker`` and ``celery beat`` processes
on PostgreSQL and Redis (the fault harness's facility, nothing broken on purpose).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.faults.conftest import facility, template_database
from tests.faults.harness import Facility, wait_for
from tests.subprocesses import manage, python

__all__ = ["facility", "template_database"]  # fixtures, used by name

REPORT = """
import json
from pipelines.models import DataProduct, ExecutedReductionStep, PhysicalCopy, RawDataPackage
from pipelines.services.results import product_raw_packages
runs = []
for run in ExecutedReductionStep.objects.select_related("reduction_step__pipeline").order_by("pk"):
    products = []
    for product in run.products.order_by("relative_path"):
        copy = PhysicalCopy.objects.filter(data_product=product, status="present",
                                           integrity="verified").first()
        products.append({
            "type": product.product_type, "path": product.relative_path,
            "checksum": product.checksum,
            "copy": copy.location.root_path + "/" + copy.relative_path if copy else None,
            "raw": sorted(product_raw_packages(product).values_list("pk", flat=True)),
        })
    runs.append({
        "id": run.pk, "pipeline": run.reduction_step.pipeline.name,
        "step": run.reduction_step.name, "status": run.status, "key": run.sub_group_key,
        "exit_code": run.exit_code, "wall": run.wall_time_seconds,
        "inputs": sorted(run.input_raw_packages.values_list("pk", flat=True)),
        "upstream": sorted(run.input_products.values_list("produced_by_id", flat=True)),
        "failure": run.failure_reason, "products": products,
    })
print(json.dumps({
    "runs": runs,
    "archived": sorted(
        RawDataPackage.objects.filter(state="archived").values_list("pk", flat=True)
    ),
    "modules": {str(p.pk): p.instrument_module.name for p in RawDataPackage.objects.all()},
}))
"""


def assert_every_demo_run_completed_with_lineage(state: dict) -> None:  # type: ignore[type-arg]
    runs = state["runs"]
    assert runs, "no runs were created"
    failures = {r["id"]: r["failure"][:500] for r in runs if r["status"] != "completed"}
    assert failures == {}
    pipelines = {r["pipeline"] for r in runs}
    assert pipelines == {"Prime-Cam 280 GHz maps", "Prime-Cam 350 GHz maps"}
    for run in runs:
        assert run["exit_code"] == 0 and run["wall"] is not None
        types = {p["type"] for p in run["products"]}
        if run["step"] == "calibrate":
            assert "intermediate" in types  # a non-final step writes to its workspace
            assert run["upstream"] == []
        else:
            assert {"science", "qa_metric", "plot", "statistics", "log"} <= types
            assert run["upstream"], "combine ran without upstream products"
        for product in run["products"]:
            assert product["copy"] is not None and Path(product["copy"]).is_file()
            # Lineage: every product leads back to archived raw packages of its run's inputs.
            assert product["raw"] and set(product["raw"]) <= set(state["archived"])
            assert set(run["inputs"]) <= set(product["raw"]) or not run["inputs"]
    # Every archived package of a served module was calibrated, and combined.
    for step in ("calibrate", "combine"):
        covered = {pk for r in runs if r["step"] == step for pk in r["inputs"]}
        prime = {int(pk) for pk, module in state["modules"].items() if "GHz" in module}
        assert prime <= covered, (step, prime - covered)


def test_the_demo_runs_every_demo_pipeline_to_completed_products(tmp_path: Path) -> None:
    var = tmp_path / "var"
    result = manage(var, "demo", "--no-serve", "--count", "3", "--timeout", "400", timeout=500)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "facility idle after" in result.stdout
    state = json.loads(python(var, REPORT))
    assert_every_demo_run_completed_with_lineage(state)
    # The combined science file is what the demo reduction wrote, byte for byte.
    science = [p for r in state["runs"] for p in r["products"] if p["type"] == "science"]
    assert science and all(Path(p["copy"]).stat().st_size > 0 for p in science)


def test_real_worker_and_beat_processes_run_the_demo_pipelines_on_postgresql_and_redis(
    facility: Facility,
) -> None:
    facility.load_demo(scans=2)
    facility.start_worker("worker", concurrency=2)
    facility.start_beat("beat")

    def done() -> bool:
        rows = facility.sql("SELECT status FROM executed_reduction_step")
        statuses = {status for (status,) in rows}
        combines = facility.sql(
            "SELECT count(*) FROM executed_reduction_step r JOIN reduction_step s "
            "ON s.id = r.reduction_step_id WHERE s.name = 'combine' AND r.status = 'completed'"
        )[0][0]
        # Two pipelines, two sources (Prime-Cam scans of COSMOS and Mars): four combined runs.
        return bool(rows) and statuses == {"completed"} and combines >= 4

    try:
        wait_for(done, timeout=240, what="every demo run completed", every=1)
    except AssertionError:
        runs = facility.sql(
            "SELECT id, status, sub_group_key, failure_reason FROM executed_reduction_step"
        )
        packages = facility.sql("SELECT state, count(*) FROM raw_data_package GROUP BY state")
        raise AssertionError(
            f"runs: {runs}\npackages: {packages}\nworker log tail:\n"
            f"{facility.log('worker')[-4000:]}\nbeat log tail:\n{facility.log('beat')[-2000:]}"
        ) from None
    state = json.loads(facility.python(REPORT))
    assert_every_demo_run_completed_with_lineage(state)
