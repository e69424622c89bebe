"""``manage.py backfill`` (issue 12 item 5): a pipeline or step, a range of scan start times,
--missing-only / --failed / --all, --dry-run that changes nothing, --max-active, a progress bar
and a one-line summary; runs triggered_by=backfill in a resumable campaign."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipelines.models import Campaign, ExecutedReductionStep, RunStatus
from pipelines.services import campaigns

from .campaign_helpers import (
    fail_for_good,
    made_run,
    row_counts,
    scan_package,
    two_step_pipeline,
)

pytestmark = pytest.mark.django_db

RANGE = ["--since", "2026-03-01", "--until", "2026-03-08"]


def backfill(*args: str) -> str:
    out = StringIO()
    call_command("backfill", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _world():
    pipeline, calibrate, combine = two_step_pipeline()
    packages = [scan_package(day) for day in (2, 3, 4, 5)]
    outside = scan_package(20)
    return pipeline, calibrate, combine, packages, outside


def _keys(step) -> list[str]:
    return sorted(
        ExecutedReductionStep.objects.filter(reduction_step=step).values_list(
            "sub_group_key", flat=True
        )
    )


def test_help_describes_the_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        call_command("backfill", "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--missing-only" in out and "--max-active" in out and "--dry-run" in out


def test_missing_only_creates_runs_for_unprocessed_scans_in_the_range() -> None:
    pipeline, calibrate, combine, packages, _outside = _world()
    made_run(calibrate, f"executed_obs_unit={packages[0].executed_obs_unit_id}", [packages[0]])
    summary = backfill("--pipeline", pipeline.name, *RANGE, "--missing-only", "--reason", "gap")
    runs = ExecutedReductionStep.objects.filter(reduction_step=calibrate, campaign__isnull=False)
    assert runs.count() == 3  # the processed scan and the one outside the range are left out
    assert {r.input_raw_packages.get() for r in runs} == set(packages[1:])
    assert all(r.triggered_by == "backfill" and r.status == RunStatus.PENDING for r in runs)
    campaign = Campaign.objects.get()
    assert campaign.kind == "backfill" and campaign.reason == "gap"
    assert campaign.parameters["mode"] == "missing" and campaign.runs_created == 3
    # combine waits for its upstream runs; the summary is one line.
    assert not ExecutedReductionStep.objects.filter(reduction_step=combine).exists()
    assert summary.count("\n") == 1
    assert "backfill campaign" in summary and "3 run(s) created now" in summary


def test_failed_reruns_only_scans_whose_latest_run_failed_for_good() -> None:
    pipeline, calibrate, _combine, packages, _outside = _world()
    keys = [f"executed_obs_unit={p.executed_obs_unit_id}" for p in packages]
    made_run(calibrate, keys[0], [packages[0]])
    failed, _ = made_run(calibrate, keys[1], [packages[1]])
    fail_for_good(failed)
    backfill("--step", f"{pipeline.name}/calibrate", *RANGE, "--failed")
    created = ExecutedReductionStep.objects.filter(campaign__isnull=False)
    assert [r.sub_group_key for r in created] == [keys[1]]


def test_all_reruns_every_sub_group_in_the_range_even_processed_ones() -> None:
    pipeline, calibrate, _combine, packages, _outside = _world()
    made_run(calibrate, f"executed_obs_unit={packages[0].executed_obs_unit_id}", [packages[0]])
    backfill("--step", f"{pipeline.name}/calibrate", *RANGE, "--all")
    assert ExecutedReductionStep.objects.filter(campaign__isnull=False).count() == 4


def test_a_dry_run_prints_the_runs_with_their_sub_groups_and_changes_nothing() -> None:
    pipeline, _calibrate, _combine, packages, _outside = _world()
    before = row_counts()
    out = backfill("--pipeline", pipeline.name, *RANGE, "--all", "--dry-run")
    assert row_counts() == before
    for package in packages:
        assert f"calibrate [executed_obs_unit={package.executed_obs_unit_id}]" in out
    assert "combine [all]" in out and "upstream calibrate planned" in out
    assert "4 run(s) would be created" in out and "nothing changed" in out


def test_running_the_same_backfill_again_resumes_the_campaign_and_duplicates_nothing() -> None:
    pipeline, calibrate, _combine, _packages, _outside = _world()
    backfill("--pipeline", pipeline.name, *RANGE, "--all", "--max-active", "2")
    again = backfill("--pipeline", pipeline.name, *RANGE, "--all", "--max-active", "3")
    assert Campaign.objects.count() == 1
    assert Campaign.objects.get().max_active == 3
    assert ExecutedReductionStep.objects.filter(reduction_step=calibrate).count() == 4
    assert "(resumed" in again and "0 run(s) created now" in again


def test_an_interrupted_backfill_run_again_creates_only_the_missing_runs(monkeypatch) -> None:
    pipeline, calibrate, _combine, _packages, _outside = _world()
    real = campaigns.campaign_create_run
    made: list[int] = []

    def crash_after_two(*args, **kwargs):
        if len(made) == 2:
            raise KeyboardInterrupt("operator pressed ctrl-c")
        run = real(*args, **kwargs)
        made.append(run.pk)
        return run

    monkeypatch.setattr(campaigns, "campaign_create_run", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        backfill("--pipeline", pipeline.name, *RANGE, "--all")
    assert ExecutedReductionStep.objects.count() == 2
    monkeypatch.setattr(campaigns, "campaign_create_run", real)
    backfill("--pipeline", pipeline.name, *RANGE, "--all")
    keys = _keys(calibrate)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert Campaign.objects.count() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pipeline", "nope", *RANGE, "--all"], "no pipeline named 'nope'"),
        (["--step", "nope", *RANGE, "--all"], "write PIPELINE/STEP"),
        (["--since", "2026-03-09", "--until", "2026-03-01", "--all"], "is not before"),
        (["--since", "yesterday", "--until", "2026-03-01", "--all"], "not an ISO date"),
        ([*RANGE, "--all", "--max-active", "0"], "at least 1"),
        ([*RANGE], "one of the arguments --missing-only --failed --all is required"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(args, message) -> None:
    pipeline, *_ = _world()
    if args[0] not in ("--pipeline", "--step"):
        args = ["--pipeline", pipeline.name, *args]
    before = row_counts()
    with pytest.raises(CommandError, match=message):
        backfill(*args)
    assert row_counts() == before


def test_an_unknown_step_is_named_with_the_known_ones() -> None:
    pipeline, *_ = _world()
    with pytest.raises(CommandError, match="has no step 'reduce'; known: calibrate, combine"):
        backfill("--step", f"{pipeline.name}/reduce", *RANGE, "--all")


def test_a_disabled_pipeline_is_refused() -> None:
    pipeline, *_ = _world()
    type(pipeline).objects.filter(pk=pipeline.pk).update(enabled=False)
    with pytest.raises(CommandError, match="is disabled"):
        backfill("--pipeline", pipeline.name, *RANGE, "--all")
