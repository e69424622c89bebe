"""Pieces every ops-db model shares: the operation Status, timestamps, leases, and the
declaration of allowed state transitions that ``pipelines.services.states.transition`` enforces."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar, NamedTuple

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
    field: str, choices: type[models.TextChoices], name: str, message: str = ""
) -> models.CheckConstraint:
    """A database check constraint that keeps ``field`` inside ``choices``. Model validation (the
    admin's forms) reports a violation as ``message``, by default "<Field> must be one of: ..."
    with the choices' labels."""
    if not message:
        labels = ", ".join(str(label) for label in choices.labels)
        message = f"{field.replace('_', ' ').capitalize()} must be one of: {labels}."
    return models.CheckConstraint(
        condition=models.Q(**{f"{field}__in": choices.values}),
        name=name,
        # Constraint messages are %-formatted with the constraint's name.
        violation_error_message=message.replace("%", "%%"),
    )


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


class Phase(NamedTuple):
    """One claimable state field of an operation row and the columns that go with it.

    ``requires``: lookups the row must match for this phase to be live (unpacking happens only
    once its transfer has completed). The lease and claim-token columns are shared by every phase
    of a row: phases run one after another, never at once.
    """

    field: str
    retry_field: str
    error_field: str
    requires: dict[str, str]
    started_field: str = "started_at"
    finished_field: str = "finished_at"


class OperationQuerySet(models.QuerySet[Any]):
    """Filters every manager and the reconciler share. ``field`` names the state field of the
    phase (``status``, or ``unpack_status`` of a transfer)."""

    def due(self, field: str = "status") -> OperationQuerySet:
        """Rows waiting to be claimed, oldest first (the manager's claim query)."""
        requires = self.model.PHASES[field].requires
        return self.filter(**{field: Status.PENDING}, **requires).order_by("created_at", "pk")

    def abandoned(self, now: Any, field: str = "status") -> OperationQuerySet:
        """Claimed rows whose lease expired before ``now``, and claimed rows with no lease at all
        that have not changed for a whole lease period (``NULL < now`` never matches, so a claim
        written without a lease would otherwise stay claimed forever)."""
        from django.conf import settings

        requires = self.model.PHASES[field].requires
        cutoff = now - timedelta(seconds=settings.WORKFLOW_LEASE_SECONDS)
        claimed = {f"{field}__in": [Status.SCHEDULED, Status.IN_PROGRESS], **requires}
        return self.filter(
            models.Q(lease_expires_at__lt=now)
            | models.Q(lease_expires_at__isnull=True, updated_at__lt=cutoff),
            **claimed,
        )


class Claimable(models.Model):
    """Lease, claim, retry, idempotency and timing columns of every row a manager claims and a
    worker works on: operation rows and reduction runs.

    A claimer writes ``claim_token`` (new for every claim), ``lease_owner`` (who, for people) and
    ``lease_expires_at``. Every later move of the claimed row is conditional on the token, so a
    report from an earlier claim (a worker whose lease expired and whose row was handed back and
    claimed again) changes nothing. The reconciler hands back a row whose lease expired.
    """

    retry_count = models.PositiveIntegerField(default=0)
    max_retries = models.PositiveIntegerField(default=3)
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    claim_token = models.CharField(max_length=64, blank=True, default="")
    # Set in the same transaction as the state change that performs a side effect, so a repeated
    # task can tell the side effect already happened.
    idempotency_key = models.CharField(max_length=200, blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


def operation_indexes(prefix: str) -> list[models.Index]:
    """The index every operation table needs: the manager's due query (rows by status) and the
    reconciler's (claimed rows whose lease expired)."""
    return [models.Index(fields=["status", "lease_expires_at"], name=f"{prefix}_status_lease_idx")]


class Operation(StatefulModel, TimeStamped, Claimable):
    """One unit of data-transfer work, claimed by a manager and done by one worker task."""

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    failure_error_message = models.TextField(blank=True, default="")

    TRANSITIONS: ClassVar[dict[str, dict[str, set[str]]]] = {"status": STATUS_TRANSITIONS}
    PHASES: ClassVar[dict[str, Phase]] = {
        "status": Phase("status", "retry_count", "failure_error_message", {})
    }

    objects = OperationQuerySet.as_manager()

    class Meta:
        abstract = True

    @property
    def is_terminal(self) -> bool:
        return self.status == Status.COMPLETED
