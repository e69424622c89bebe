"""The append-only history of every state change. "Why is this stuck?" is answered here."""

from __future__ import annotations

from typing import Any

from django.db import models


class AppendOnlyError(RuntimeError):
    pass


class StateEventQuerySet(models.QuerySet["StateEvent"]):
    def update(self, **kwargs: Any) -> int:
        raise AppendOnlyError("state events are append-only; they cannot be updated")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("state events are append-only; they cannot be deleted")

    def for_object(self, instance: models.Model) -> StateEventQuerySet:
        return self.filter(entity=instance._meta.db_table, object_id=str(instance.pk))


class StateEvent(models.Model):
    """One move of one state field of one row: when, who, from, to and why."""

    entity = models.CharField(max_length=64, help_text="table name of the row that moved")
    object_id = models.CharField(max_length=64)
    field = models.CharField(max_length=32, default="status")
    from_state = models.CharField(max_length=32, blank=True, default="")
    to_state = models.CharField(max_length=32)
    actor = models.CharField(max_length=200)
    reason = models.TextField(blank=True, default="")
    context = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = StateEventQuerySet.as_manager()

    class Meta:
        db_table = "state_event"
        ordering = ["-created_at", "-id"]
        indexes = [
            # Timeline of one row (run detail, `manage.py why`).
            models.Index(
                fields=["entity", "object_id", "created_at"], name="state_event_object_idx"
            ),
            # Dashboard: recent failures.
            models.Index(fields=["to_state", "-created_at"], name="state_event_to_state_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.entity}#{self.object_id} {self.field}: {self.from_state} -> {self.to_state}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise AppendOnlyError("state events are append-only; they cannot be changed")
        # Always an INSERT: a new instance given an existing id would otherwise be saved with an
        # UPDATE of that row (Django tries UPDATE first when the pk is set), rewriting history.
        kwargs["force_insert"] = True
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("state events are append-only; they cannot be deleted")
