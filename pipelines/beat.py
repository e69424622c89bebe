"""The beat scheduler: django-celery-beat's database scheduler, except that the entries of
``CELERY_BEAT_SCHEDULE`` only create missing rows.

The stock scheduler writes every declared entry over its row at each start, so an operator's
retiming or pausing of a manager in the admin would be undone by the next beat restart. Here a
row that exists is the operator's: it is left as it is (a changed declaration in settings then
needs the row edited or deleted in the admin; deleting it makes the next start recreate it).
"""

from __future__ import annotations

import logging
from typing import Any

from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler

log = logging.getLogger(__name__)


class Scheduler(DatabaseScheduler):
    def update_from_dict(self, mapping: dict[str, Any]) -> None:
        existing = set(
            PeriodicTask.objects.filter(name__in=list(mapping)).values_list("name", flat=True)
        )
        missing = {name: fields for name, fields in mapping.items() if name not in existing}
        if existing:
            log.info("beat: keeping the stored schedule of %s", ", ".join(sorted(existing)))
        super().update_from_dict(missing)
