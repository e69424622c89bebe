"""The one writer of state fields.

``transition()`` checks the move against the model's ``TRANSITIONS`` table, applies it with a
conditional ``UPDATE ... WHERE <field> = <expected>`` so that of two racing callers exactly one
wins, and writes the ``StateEvent`` row in the same transaction. Every manager, worker, view and
command moves states through it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from django.db import models, transaction
from django.db.models.expressions import Combinable
from django.utils import timezone

from pipelines.models import StateEvent, StatefulModel

M = TypeVar("M", bound=StatefulModel)


class TransitionError(Exception):
    """Base of the errors ``transition`` raises; nothing was changed when one is raised."""


class ForbiddenTransition(TransitionError):
    """The move is not in the model's transition table."""


class TransitionConflict(TransitionError):
    """Another process moved the row first (the race was lost)."""


def transition(
    instance: M,
    to: str,
    *,
    field: str = "status",
    actor: str,
    reason: str = "",
    expected: str | None = None,
    updates: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    where: dict[str, Any] | None = None,
) -> M:
    """Move ``instance.<field>`` from its current (or ``expected``) value to ``to``.

    ``updates`` are other columns written in the same UPDATE (e.g. a lease, a failure message,
    ``F("retry_count") + 1``). ``where`` adds lookups the row must still match for the UPDATE to
    apply (e.g. ``{"lease_owner": me}`` or ``{"lease_expires_at__lt": now}``), so a claim taken
    over meanwhile loses like a changed state. Returns the instance with the new values set.
    Raises ``ForbiddenTransition`` for a move the table does not allow and
    ``TransitionConflict`` when the row is no longer in the expected state or no longer matches
    ``where``; in both cases nothing changed.
    """
    model = type(instance)
    table = model.TRANSITIONS.get(field)
    if table is None:
        raise ValueError(f"{model.__name__}.{field} is not a state field")
    to = str(to)
    current = str(expected if expected is not None else getattr(instance, field))
    label = f"{model.__name__} {instance.pk}"
    _refuse_state_updates(model, updates)
    if to not in table:
        raise ForbiddenTransition(f"{label}: {to!r} is not a {field} value of {model.__name__}")
    if to not in table.get(current, set()):
        allowed = ", ".join(sorted(table.get(current, set()))) or "none (terminal)"
        raise ForbiddenTransition(
            f"{label}: {field} may not move from {current!r} to {to!r} (allowed: {allowed})"
        )
    values: dict[str, Any] = {field: to, **(updates or {})}
    if any(f.name == "updated_at" for f in model._meta.concrete_fields):
        values.setdefault("updated_at", timezone.now())
    with transaction.atomic():
        changed = (
            model._default_manager.filter(pk=instance.pk, **{field: current})
            .filter(**(where or {}))
            .update(**values)
        )
        if changed != 1:
            actual = (
                model._default_manager.filter(pk=instance.pk).values_list(field, flat=True).first()
            )
            if actual == current and where:
                raise TransitionConflict(
                    f"{label}: {field} is {current!r} but the row no longer matches {where!r}; "
                    f"the move to {to!r} was not applied"
                )
            raise TransitionConflict(
                f"{label}: expected {field}={current!r} but it is {actual!r}; "
                f"the move to {to!r} was not applied"
            )
        StateEvent.objects.create(
            entity=model._meta.db_table,
            object_id=str(instance.pk),
            field=field,
            from_state=current,
            to_state=to,
            actor=actor,
            reason=reason,
            context=context or {},
        )
    expressions = [k for k, v in values.items() if isinstance(v, Combinable)]
    for key, value in values.items():
        if key not in expressions:
            setattr(instance, key, value)
    if expressions:
        instance.refresh_from_db(fields=expressions)
    return instance


def transition_batch(
    queryset: models.QuerySet[Any],
    to: str,
    *,
    field: str = "status",
    expected: str,
    actor: str,
    reason: str = "",
    updates: dict[str, Any],
    marker: str,
    limit: int | None = None,
) -> list[Any]:
    """Move up to ``limit`` rows of ``queryset`` whose ``field`` is ``expected`` to ``to`` in one
    conditional UPDATE, and write one event per moved row with one bulk INSERT, in one
    transaction. Returns the primary keys of the rows this call moved, in ``queryset``'s order.

    ``updates`` must set ``marker`` (a column name) to a value unique to this call, such as a
    claim token: the moved rows are read back by that value, which is the portable equivalent
    of ``UPDATE ... RETURNING``. On PostgreSQL the candidates are locked with ``SKIP LOCKED``,
    so two callers at once take disjoint batches instead of waiting on each other; elsewhere the
    conditional UPDATE alone decides (a row another caller moved first is simply not moved).
    """
    model = queryset.model
    table = model.TRANSITIONS.get(field)
    if table is None:
        raise ValueError(f"{model.__name__}.{field} is not a state field")
    _refuse_state_updates(model, updates)
    if to not in table.get(str(expected), set()):
        raise ForbiddenTransition(
            f"{model.__name__}: {field} may not move from {expected!r} to {to!r}"
        )
    if marker not in updates:
        raise ValueError(f"updates must set the marker column {marker!r}")
    values: dict[str, Any] = {field: to, **updates}
    if any(f.name == "updated_at" for f in model._meta.concrete_fields):
        values.setdefault("updated_at", timezone.now())
    with transaction.atomic():
        candidates = queryset.filter(**{field: expected})
        if connection_supports_skip_locked(queryset.db):
            candidates = candidates.select_for_update(skip_locked=True, of=("self",))
        ids = list(candidates.values_list("pk", flat=True)[:limit])
        if not ids:
            return []
        model._default_manager.filter(pk__in=ids, **{field: expected}).update(**values)
        moved = set(
            model._default_manager.filter(pk__in=ids, **{marker: updates[marker]}).values_list(
                "pk", flat=True
            )
        )
        ids = [pk for pk in ids if pk in moved]
        StateEvent.objects.bulk_create(
            [
                StateEvent(
                    entity=model._meta.db_table,
                    object_id=str(pk),
                    field=field,
                    from_state=str(expected),
                    to_state=str(to),
                    actor=actor,
                    reason=reason,
                    context={},
                )
                for pk in ids
            ]
        )
    return ids


def connection_supports_skip_locked(alias: str) -> bool:
    from django.db import connections

    features = connections[alias].features
    return bool(features.has_select_for_update_skip_locked and features.has_select_for_update_of)


def _refuse_state_updates(model: type[StatefulModel], updates: dict[str, Any] | None) -> None:
    """Another state field written as a side column would move without a check or an event."""
    sneaked = sorted(set(updates or {}) & set(model.TRANSITIONS))
    if sneaked:
        raise ValueError(
            f"{model.__name__}: state field(s) {', '.join(sneaked)} may only move through "
            "transition(), not as updates"
        )


def record_creation(
    instance: models.Model, *, actor: str, reason: str = "", field: str = "status"
) -> StateEvent:
    """Write the event for a row that was just created in its initial state."""
    return StateEvent.objects.create(
        entity=instance._meta.db_table,
        object_id=str(instance.pk),
        field=field,
        from_state="",
        to_state=str(getattr(instance, field)),
        actor=actor,
        reason=reason or "created",
    )
