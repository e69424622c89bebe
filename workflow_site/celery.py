"""The Celery app. Workers: ``celery -A workflow_site worker -Q <queues>``; beat:
``celery -A workflow_site beat -S django_celery_beat.schedulers:DatabaseScheduler``."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflow_site.settings")

app = Celery("workflow_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_routes = ("pipelines.queues.route_task",)
app.autodiscover_tasks()
