"""Beat: the managers are periodic tasks in django-celery-beat's tables, and an operator's
retiming or pausing in the admin survives a beat restart."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from pipelines.beat import Scheduler
from workflow_site.celery import app

# The scheduler calls close_old_connections(), which closes a connection left inside a test
# transaction on PostgreSQL: these tests run with real commits, like beat itself.
pytestmark = pytest.mark.django_db(transaction=True)


def start_beat() -> Scheduler:
    # What `celery beat -S pipelines.beat:Scheduler` does when it starts.
    return Scheduler(app=app)


def test_the_project_uses_the_scheduler_that_keeps_operator_changes() -> None:
    assert settings.CELERY_BEAT_SCHEDULER == "pipelines.beat:Scheduler"


def test_every_declared_manager_becomes_a_periodic_task_of_a_registered_task() -> None:
    app.loader.import_default_modules()  # what a worker does at start: autodiscover the tasks
    start_beat()
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        row = PeriodicTask.objects.get(name=name)
        assert row.task == entry["task"]
        assert row.task in app.tasks, f"{name} names {row.task}, which is not a task"
        assert row.enabled


def test_an_operators_retiming_and_pausing_survive_a_beat_restart() -> None:
    start_beat()
    name = "run-packaging-manager"
    row = PeriodicTask.objects.get(name=name)
    slow, _ = IntervalSchedule.objects.get_or_create(every=17, period=IntervalSchedule.MINUTES)
    row.interval = slow
    row.enabled = False
    row.save()

    start_beat()

    row.refresh_from_db()
    assert (row.interval.every, row.interval.period, row.enabled) == (17, "minutes", False)


def test_a_deleted_entry_is_recreated_from_the_settings_at_the_next_start() -> None:
    start_beat()
    name = "run-packaging-manager"
    PeriodicTask.objects.filter(name=name).delete()
    start_beat()
    row = PeriodicTask.objects.get(name=name)
    declared = settings.CELERY_BEAT_SCHEDULE[name]["schedule"]
    assert isinstance(declared, timedelta)
    assert row.interval.every * {"seconds": 1, "minutes": 60}[row.interval.period] == int(
        declared.total_seconds()
    )
