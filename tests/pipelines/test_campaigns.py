"""Campaigns (issue 12 item 4): a row per backfill or reprocessing; the workflow manager admits at
most ``max_active`` runs of a campaign at a time, also after the command has exited; the campaign
manager creates downstream runs as their upstream completes and finishes the campaign."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from pipelines.models import Campaign, ExecutedReductionStep, RunStatus
from pipelines.services.campaigns import (
    backfill_parameters,
    campaign_advance,
    campaign_cancel,
    campaign_find_or_create,
    campaign_manager_tick,
)
from pipelines.services.runs import run_claim_batch

from .campaign_helpers import complete, made_run, scan_package, two_step_pipeline

pytestmark = pytest.mark.django_db

RANGE = ["--since", "2026-03-01", "--until", "2026-03-31"]


def _backfill(pipeline, *extra: str) -> Campaign:
    call_command(
        "backfill", "--pipeline", pipeline.name, *RANGE, "--all", *extra,
        stdout=StringIO(), stderr=StringIO(),
    )  # fmt: skip
    return Campaign.objects.get()


def _admitted(campaign: Campaign) -> int:
    return campaign.runs.exclude(status=RunStatus.PENDING).count()


def test_the_workflow_manager_admits_at_most_max_active_runs_of_a_campaign() -> None:
    pipeline, calibrate, _combine = two_step_pipeline()
    for day in range(1, 6):
        scan_package(day)
    campaign = _backfill(pipeline, "--max-active", "2")
    other, _ = made_run(calibrate, "not-a-campaign", [])
    ExecutedReductionStep.objects.filter(pk=other.pk).update(status=RunStatus.PENDING)
    claimed = run_claim_batch(owner="test", limit=100)
    assert _admitted(campaign) == 2
    assert other.pk in claimed  # runs of no campaign are not throttled
    # Ticks while the two are in the workflow admit nothing more.
    assert run_claim_batch(owner="test", limit=100) == []
    # One finishes: one more is admitted.
    first = campaign.runs.exclude(status=RunStatus.PENDING).first()
    complete(first)
    assert len(run_claim_batch(owner="test", limit=100)) == 1
    assert campaign.runs.filter(status=RunStatus.STAGING_DATA).count() == 2


def test_raising_max_active_on_resume_admits_more() -> None:
    pipeline, _calibrate, _combine = two_step_pipeline()
    for day in range(1, 5):
        scan_package(day)
    campaign = _backfill(pipeline, "--max-active", "1")
    run_claim_batch(owner="test", limit=100)
    assert _admitted(campaign) == 1
    _backfill(pipeline, "--max-active", "3")
    run_claim_batch(owner="test", limit=100)
    assert _admitted(campaign) == 3


def test_the_same_parameters_find_the_same_campaign() -> None:
    pipeline, _calibrate, _combine = two_step_pipeline()
    params = backfill_parameters(
        pipeline=pipeline.name, since="2026-03-01", until="2026-03-02", mode="all"
    )
    first, created = campaign_find_or_create("backfill", params, max_active=4, reason="why")
    again, created_again = campaign_find_or_create("backfill", dict(params), max_active=None)
    assert created and not created_again and first.pk == again.pk and again.max_active == 4
    other = backfill_parameters(
        pipeline=pipeline.name, since="2026-03-01", until="2026-03-02", mode="missing"
    )
    assert campaign_find_or_create("backfill", other, max_active=None)[0].pk != first.pk


def test_downstream_runs_are_created_by_the_campaign_manager_once_upstream_completed() -> None:
    pipeline, calibrate, combine = two_step_pipeline()
    packages = [scan_package(day) for day in (1, 2)]
    campaign = _backfill(pipeline)
    upstream = list(campaign.runs.filter(reduction_step=calibrate))
    assert len(upstream) == 2 and campaign.waiting == 1
    assert campaign_manager_tick(owner="test")["created"] == 0  # upstream still pending
    made = [complete(run)[0] for run in upstream]
    counts = campaign_manager_tick(owner="test")
    assert counts["created"] == 1
    down = campaign.runs.get(reduction_step=combine)
    assert down.triggered_by == "backfill"
    assert set(down.input_raw_packages.all()) == set(packages)
    assert set(down.input_products.all()) == set(made)


def test_a_campaign_finishes_when_its_runs_ended_and_nothing_is_left() -> None:
    pipeline, calibrate, combine = two_step_pipeline()
    scan_package(1)
    campaign = _backfill(pipeline)
    complete(campaign.runs.get(reduction_step=calibrate))
    campaign_manager_tick(owner="test")
    complete(campaign.runs.get(reduction_step=combine))
    counts = campaign_manager_tick(owner="test")
    campaign.refresh_from_db()
    assert counts["finished"] == 1
    assert campaign.state == "finished" and campaign.finished_at is not None
    assert (campaign.runs_created, campaign.runs_completed, campaign.runs_active) == (2, 2, 0)
    # A finished campaign is no longer advanced, and advancing it again creates nothing.
    assert campaign_advance(campaign).created == 0
    campaign.refresh_from_db()
    assert campaign.state == "finished"


def test_new_data_in_the_range_reopens_a_finished_campaign_when_run_again() -> None:
    pipeline, calibrate, combine = two_step_pipeline()
    scan_package(1)
    campaign = _backfill(pipeline)
    for step in (calibrate, combine):
        complete(campaign.runs.get(reduction_step=step))
        campaign_manager_tick(owner="test")
    campaign.refresh_from_db()
    assert campaign.state == "finished"
    late = scan_package(2)
    _backfill(pipeline)
    campaign.refresh_from_db()
    assert campaign.state == "active" and campaign.finished_at is None
    new = campaign.runs.get(reduction_step=calibrate, input_raw_packages=late)
    assert new.sub_group_key == f"executed_obs_unit={late.executed_obs_unit_id}"
    assert campaign.runs.count() == 3


def test_cancelling_a_campaign_cancels_its_runs_not_admitted_yet() -> None:
    pipeline, _calibrate, _combine = two_step_pipeline()
    for day in range(1, 4):
        scan_package(day)
    campaign = _backfill(pipeline, "--max-active", "1")
    run_claim_batch(owner="test", limit=100)
    campaign_cancel(campaign, actor="test", reason="wrong range")
    campaign.refresh_from_db()
    assert campaign.state == "cancelled"
    statuses = sorted(campaign.runs.values_list("status", flat=True))
    assert statuses == ["cancelled", "cancelled", "staging_data"]
    assert campaign_advance(campaign).created == 0


def test_campaign_state_moves_are_recorded_as_events() -> None:
    from pipelines.models import StateEvent

    pipeline, _calibrate, _combine = two_step_pipeline()
    scan_package(1)
    campaign = _backfill(pipeline)
    campaign_cancel(campaign, actor="test")
    moves = list(
        StateEvent.objects.filter(entity="campaign", object_id=str(campaign.pk))
        .order_by("id")
        .values_list("from_state", "to_state")
    )
    assert moves == [("", "active"), ("active", "cancelled")]
    assert campaign.finished_at is not None and campaign.finished_at <= timezone.now()


def test_the_admin_lists_campaigns_with_their_progress_and_cancels_them() -> None:
    from django.test import Client
    from django.urls import reverse

    from tests.factories import UserFactory

    pipeline, _calibrate, _combine = two_step_pipeline()
    scan_package(1)
    campaign = _backfill(pipeline)
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    page = client.get(reverse("admin:pipelines_campaign_changelist"))
    assert page.status_code == 200 and "0/1 completed, 1 active" in page.content.decode()
    assert (
        client.get(reverse("admin:pipelines_campaign_change", args=[campaign.pk])).status_code
        == 200
    )
    client.post(
        reverse("admin:pipelines_campaign_changelist"),
        {"action": "cancel_campaigns", "_selected_action": [campaign.pk], "index": 0},
    )
    campaign.refresh_from_db()
    assert campaign.state == "cancelled"


def test_why_says_where_a_campaign_stands() -> None:
    from pipelines.services.why import explain, resolve

    pipeline, _calibrate, _combine = two_step_pipeline()
    for day in range(1, 4):
        scan_package(day)
    campaign = _backfill(pipeline, "--max-active", "1", "--reason", "March gap")
    run_claim_batch(owner="test", limit=100)
    campaign_advance(campaign)
    found, _ = resolve(f"campaign:{campaign.pk}")
    explanation = explain(found)
    assert "March gap" in explanation.title
    assert explanation.sentence == (
        "active: 0 of 3 run(s) completed, 1 in the workflow and 2 waiting to be admitted "
        "(at most 1 at a time), 0 failed for good, 1 sub-group(s) to plan later"
    )
    assert [e.to_state for e in explanation.events] == ["active"]
