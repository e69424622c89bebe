"""Campaigns under concurrency on PostgreSQL (threads, each with its own connection): two
workflow managers claiming at once admit at most ``max_active`` runs of a campaign together
(the claim locks the campaign's row), and two backfills of the same parameters at once make one
campaign and no duplicate runs. Skipped on SQLite, failed under REQUIRE_SERVICES=1."""

from __future__ import annotations

from collections import Counter
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from pipelines.models import Campaign, ExecutedReductionStep, RunStatus
from pipelines.services.runs import run_claim_batch
from tests.concurrency import together

from .campaign_helpers import scan_package, two_step_pipeline

pytestmark = pytest.mark.django_db(transaction=True)


def _backfill(pipeline: Any, *extra: str) -> None:
    call_command(
        "backfill", "--pipeline", pipeline.name, "--since", "2026-03-01", "--until",
        "2026-04-01", "--all", *extra, stdout=StringIO(), stderr=StringIO(),
    )  # fmt: skip


def test_two_workflow_managers_at_once_admit_at_most_max_active(require_postgres) -> None:
    pipeline, _calibrate, _combine = two_step_pipeline()
    for day in range(1, 9):
        scan_package(day)
    _backfill(pipeline, "--max-active", "3")
    for _ in range(3):
        together(lambda: run_claim_batch(owner="wm", limit=1))
    campaign = Campaign.objects.get()
    admitted = campaign.runs.exclude(status=RunStatus.PENDING).count()
    assert admitted == 3


def test_two_identical_backfills_at_once_make_one_campaign_and_no_duplicates(
    require_postgres,
) -> None:
    pipeline, _calibrate, _combine = two_step_pipeline()
    for day in range(1, 9):
        scan_package(day)
    together(lambda: _backfill(pipeline))
    assert Campaign.objects.count() == 1
    pairs = Counter(ExecutedReductionStep.objects.values_list("reduction_step_id", "sub_group_key"))
    assert len(pairs) == 8 and max(pairs.values()) == 1
