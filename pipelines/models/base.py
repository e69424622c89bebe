"""Pieces every ops-db model shares: the operation Status, timestamps, leases, and the
declaration of allowed state transitions that ``pipelines.services.states.transition`` enforces."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


class Status(models.TextChoices):
    """Processing status of an operation row (ops-db ``Status``)."""

    PENDING = "pending", "Pending"
    SCHEDULED = "scheduled", "Scheduled"
    IN_PROGRESS = "in_progress", "In progress"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"


# Allowed moves of an operation row. scheduled/in_progress -> pending is the retry reset and the
# lease-expiry recovery; failed -> pending is an operator's reset.
STATUS_TRANSITIONS: dict[str, set[str]] = {
    Status.PENDING: {Status.SCHEDULED, Status.FAILED},
    Status.SCHEDULED: {Status.IN_PROGRESS, Status.PENDING, Status.FAILED},
    Status.IN_PROGRESS: {Status.COMPLETED, Status.PENDING, Status.FAILED},
    Status.FAILED: {Status.PENDING},
    Status.COMPLETED: set(),
}


def choices_check(
    field: str, choices: type[models.TextChoices], name: str
) -> models.CheckConstraint:
    """A database check constraint that keeps ``field`` inside ``choices``."""
    return models.CheckConstraint(condition=models.Q(**{f"{field}__in": choices.values}), name=name)


class StatefulModel(models.Model):
    """A model whose state fields may only move along ``TRANSITIONS``.

    ``TRANSITIONS`` maps a field name to ``{from_value: {allowed to_values}}``. The only writer of
    those fields after creation is ``pipelines.services.states.transition``.
    """

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {}

    class Meta:
        abstract = True


class TimeStamped(models.Model):
    created_at = models.DateTimeField(auto_now_add=True, db_index=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class Operation(StatefulModel, TimeStamped):
    """One unit of data-transfer work, claimed by a manager and done by one worker task.

    Lease fields: a claimer sets ``lease_owner`` and ``lease_expires_at``; the reconciler hands a
    row whose lease expired back to ``pending`` so nothing stays claimed forever.
    """

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    retry_count = models.PositiveIntegerField(default=0)
    max_retries = models.PositiveIntegerField(default=3)
    failure_error_message = models.TextField(blank=True, default="")
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Set in the same transaction as the state change that performs a side effect, so a repeated
    # task can tell the side effect already happened.
    idempotency_key = models.CharField(max_length=200, blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {"status": STATUS_TRANSITIONS}

    class Meta:
        abstract = True

    @property
    def is_terminal(self) -> bool:
        return self.status == Status.COMPLETED
