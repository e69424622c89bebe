"""``manage.py reprocess`` (issue 12 item 6): stale products are re-run as a campaign over the
same inputs; downstream replacements wait for their upstream one; replaced products keep their
lineage and are marked superseded, not deleted; new outputs go to new attempt directories."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipelines.containers import run_layout
from pipelines.models import Campaign, DataProduct, ExecutedReductionStep
from pipelines.services.campaigns import campaign_manager_tick
from pipelines.services.results import product_raw_packages
from tests.factories import ReductionSoftwareVersionFactory

from .campaign_helpers import complete, made_run, row_counts, scan_package, two_step_pipeline

pytestmark = pytest.mark.django_db


def reprocess(*args: str) -> str:
    out = StringIO()
    call_command("reprocess", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _world():
    """calibrate over two scans -> combine over both; calibrate's software gets 1.1.0, so all
    three runs are stale (combine through lineage)."""
    pipeline, calibrate, combine = two_step_pipeline()
    a, b = scan_package(1), scan_package(2)
    run_a, [prod_a] = made_run(calibrate, "a", [a])
    run_b, [prod_b] = made_run(calibrate, "b", [b])
    run_c, [_prod_c] = made_run(combine, "all", [a, b], consumed=[prod_a, prod_b])
    ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    return pipeline, calibrate, combine, {"a": run_a, "b": run_b, "c": run_c}, (a, b)


def test_help_describes_the_command(capsys) -> None:
    with pytest.raises(SystemExit):
        call_command("reprocess", "--help")
    assert "superseded" in capsys.readouterr().out


def test_stale_runs_are_replaced_upstream_first_over_the_same_inputs() -> None:
    _pipeline, _calibrate, _combine, old, (a, _b) = _world()
    summary = reprocess("--reason", "calibrate 1.1.0 fixes the baseline", "--max-active", "1")
    campaign = Campaign.objects.get()
    assert campaign.kind == "reprocess" and campaign.max_active == 1
    new = {r.replaces_id: r for r in campaign.runs.all()}
    # Only calibrate now; combine waits for both replacements.
    assert set(new) == {old["a"].pk, old["b"].pk}
    assert set(new[old["a"].pk].input_raw_packages.all()) == {a}
    assert all(r.triggered_by == "reprocess" for r in new.values())
    assert new[old["a"].pk].software_version.version == "1.1.0"
    assert "2 run(s) created now" in summary and "1 sub-group(s) later" in summary
    # The marks the admin shows were refreshed by the command.
    assert DataProduct.objects.filter(stale_since__isnull=False).count() == 3


def test_the_downstream_replacement_consumes_the_new_upstream_products() -> None:
    _pipeline, _calibrate, combine, old, _ = _world()
    reprocess()
    campaign = Campaign.objects.get()
    new_products = [complete(r)[0] for r in campaign.runs.all()]
    assert campaign_manager_tick(owner="test")["created"] == 1
    down = campaign.runs.get(reduction_step=combine)
    assert down.replaces_id == old["c"].pk
    assert set(down.input_products.all()) == set(new_products)


def test_completed_replacements_supersede_the_old_products_which_keep_their_lineage() -> None:
    _pipeline, _calibrate, combine, old, (a, b) = _world()
    reprocess()
    campaign = Campaign.objects.get()
    for run in campaign.runs.all():
        complete(run)
    campaign_manager_tick(owner="test")
    complete(campaign.runs.get(reduction_step=combine))
    counts = campaign_manager_tick(owner="test")
    assert counts["finished"] == 1
    old_c = DataProduct.objects.get(produced_by=old["c"])
    new_c = DataProduct.objects.get(produced_by__replaces=old["c"])
    assert old_c.superseded_by == new_c and old_c.superseded_at is not None
    # Not deleted, and its lineage still leads to the raw data.
    assert set(product_raw_packages(old_c)) == {a, b}
    assert DataProduct.objects.filter(superseded_at__isnull=False).count() == 3
    # Nothing is left to reprocess.
    assert "0 run(s) would be created" in reprocess("--dry-run")


def test_new_outputs_go_to_new_attempt_directories() -> None:
    _pipeline, calibrate, _combine, old, _ = _world()
    reprocess()
    new = ExecutedReductionStep.objects.get(replaces=old["a"])
    root = Path("/data/processing")
    before = run_layout(root, calibrate.pipeline_id, old["a"].sub_group_key, old["a"].pk, 1)
    after = run_layout(root, calibrate.pipeline_id, new.sub_group_key, new.pk, new.attempt)
    assert before.run_dir != after.run_dir and before.run_dir.parent == after.run_dir.parent


def test_a_dry_run_prints_the_plan_and_changes_nothing() -> None:
    _world()
    before = row_counts()
    out = reprocess("--dry-run")
    assert row_counts() == before
    assert out.count("would create: ") == 2 and "later: " in out and "nothing changed" in out


def test_running_it_again_creates_no_duplicates() -> None:
    _world()
    reprocess()
    again = reprocess()
    assert Campaign.objects.count() == 1
    assert ExecutedReductionStep.objects.filter(replaces__isnull=False).count() == 2
    assert "0 run(s) created now" in again


def test_a_step_whose_stale_upstream_is_outside_the_filter_is_not_rerun() -> None:
    pipeline, *_ = _world()
    out = reprocess("--step", f"{pipeline.name}/combine")
    assert not ExecutedReductionStep.objects.filter(replaces__isnull=False).exists()
    assert "1 upstream stale outside the filter" in out


def test_the_pipeline_filter_leaves_other_pipelines_alone() -> None:
    _world()
    other, *_rest = _world()
    reprocess("--pipeline", other.name)
    replaced = ExecutedReductionStep.objects.filter(replacements__isnull=False)
    assert {r.reduction_step.pipeline_id for r in replaced} == {other.pk}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pipeline", "nope"], "no pipeline named 'nope'"),
        (["--step", "calibrate"], "write PIPELINE/STEP"),
        (["--max-active", "-1"], "at least 1"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(args, message) -> None:
    _world()
    before = row_counts()
    with pytest.raises(CommandError, match=message):
        reprocess(*args)
    assert row_counts() == before
