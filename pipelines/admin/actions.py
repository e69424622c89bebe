"""Admin actions. Each one moves states only through ``transition()`` (or calls a service), row by
row: a row in the wrong state, or one a worker moved first, is named in a warning and left as it
is, and the rest still go through. Every action answers with a one-line summary."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import model_ngettext
from django.db import IntegrityError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from pipelines.models import (
    CANCELLABLE_RUN_STATUSES,
    PackageState,
    RunStatus,
    Status,
)
from pipelines.services.operations import operation_reset
from pipelines.services.recovery import recover_expired_leases
from pipelines.services.states import ForbiddenTransition, TransitionConflict, transition

from .base import admin_actor

# Rows one action run handles; "select all" on a million-row changelist must not turn into a
# million transitions in one request. The operator runs the action again for the rest.
ACTION_LIMIT = 1000
# Rows named in one warning; the count says how many more there were.
NAMED_LIMIT = 10


def _names(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:NAMED_LIMIT])
    if len(labels) > NAMED_LIMIT:
        shown += f" and {len(labels) - NAMED_LIMIT} more"
    return shown


def move_rows(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Any],
    *,
    to: str,
    from_states: Collection[str],
    field: str = "status",
    reason: str,
    verb: str,
    updates: dict[str, Any] | None = None,
    service: Callable[..., Any] | None = None,
) -> int:
    """Move each selected row whose ``field`` is in ``from_states`` to ``to`` and report.

    ``service``, when given, makes the move instead of a bare ``transition``: it is called as
    ``service(row, actor=..., reason=..., field=...)`` (e.g. ``operation_reset``).

    The move is conditional on the state the row was read in (``expected``), so a row a worker
    moved in the meantime is reported as a conflict rather than overwritten. Returns the number
    of rows moved; reports moved rows as success and every other row in a warning naming it.
    """
    rows = list(queryset[: ACTION_LIMIT + 1])
    if len(rows) > ACTION_LIMIT:
        rows = rows[:ACTION_LIMIT]
        modeladmin.message_user(
            request,
            f"Only the first {ACTION_LIMIT} selected rows were handled; run the action again "
            "for the rest.",
            messages.WARNING,
        )
    actor = admin_actor(request)
    moved = 0
    wrong_state: list[str] = []
    conflicts: list[str] = []
    for row in rows:
        current = getattr(row, field)
        if current not in from_states:
            wrong_state.append(f"{row} ({current})")
            continue
        try:
            if service is not None:
                service(row, actor=actor, reason=reason, field=field)
            else:
                transition(
                    row,
                    to,
                    field=field,
                    expected=current,
                    actor=actor,
                    reason=reason,
                    updates=dict(updates or {}),
                )
        except (ForbiddenTransition, TransitionConflict) as exc:
            conflicts.append(str(exc))
        except IntegrityError as exc:
            # A constraint such as "one active run per sub-group" refused the move; the
            # transition's own transaction rolled it back, event row included.
            conflicts.append(f"{row}: refused by the database ({exc})")
        else:
            moved += 1
    noun = model_ngettext(modeladmin.opts, moved)
    modeladmin.message_user(request, f"{verb} {moved} {noun}.", messages.SUCCESS)
    if wrong_state:
        allowed = "/".join(sorted(from_states))
        modeladmin.message_user(
            request,
            f"Left {len(wrong_state)} unchanged because their {field} is not {allowed}: "
            f"{_names(wrong_state)}.",
            messages.WARNING,
        )
    if conflicts:
        modeladmin.message_user(
            request,
            f"{len(conflicts)} could not be moved (changed meanwhile or refused): "
            f"{_names(conflicts)}.",
            messages.WARNING,
        )
    return moved


@admin.action(description="Reset failed rows to pending", permissions=["change"])
def reset_failed_to_pending(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    """Operator reset of failed operation rows: status failed -> pending with a fresh retry
    budget, so the manager picks them up again at its next tick."""
    move_rows(
        modeladmin,
        request,
        queryset,
        to=Status.PENDING,
        from_states={Status.FAILED},
        reason="operator reset",
        verb="Reset to pending:",
        service=operation_reset,
    )


@admin.action(description="Reset failed package state to waiting", permissions=["change"])
def reset_failed_package_state(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    """Raw data packages whose journey failed: state failed -> waiting, so the transfer and
    archive managers bundle them again. The package's own build ``status`` is untouched."""
    move_rows(
        modeladmin,
        request,
        queryset,
        to=PackageState.WAITING,
        from_states={PackageState.FAILED},
        field="state",
        reason="operator reset",
        verb="Reset package state to waiting:",
    )


@admin.action(description="Reset failed unpacking to pending", permissions=["change"])
def reset_failed_unpacking(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    """Data transfers whose bundle arrived but failed to unpack: unpack_status failed ->
    pending with a fresh unpack retry budget; the copy itself is not repeated."""
    move_rows(
        modeladmin,
        request,
        queryset,
        to=Status.PENDING,
        from_states={Status.FAILED},
        field="unpack_status",
        reason="operator reset of unpacking",
        verb="Reset unpacking to pending:",
        service=operation_reset,
    )


@admin.action(description="Recover expired leases now", permissions=["change"])
def recover_leases_now(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    """Run the lease reconciler at once instead of waiting for its periodic task. It covers
    every operation table and the runs, whatever rows were selected (Django only lets an action
    run with a selection)."""
    counts = recover_expired_leases(actor=admin_actor(request))
    total = sum(counts.values())
    if not total:
        modeladmin.message_user(request, "No expired leases found.", messages.INFO)
        return
    detail = ", ".join(f"{table}: {n}" for table, n in counts.items() if n)
    modeladmin.message_user(
        request, f"Recovered {total} expired lease(s) ({detail}).", messages.SUCCESS
    )


@admin.action(description="Retry failed runs", permissions=["change"])
def retry_failed_runs(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    """Manual retry through ``run_retry``: failed runs go back to pending for their next
    attempt, keeping how they were triggered. A run whose sub-group another run occupies is
    refused and reported."""
    from pipelines.services.runs import run_retry

    move_rows(
        modeladmin,
        request,
        queryset,
        to=RunStatus.PENDING,
        from_states={RunStatus.FAILED},
        reason="manual retry",
        verb="Queued again:",
        service=lambda row, *, actor, reason, field: run_retry(row, actor=actor, reason=reason),
    )


@admin.action(description="Cancel runs", permissions=["change"])
def cancel_runs(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    """Cancel pending, submitted or running runs through ``run_cancel``: the run is CANCELLED
    and a job already submitted is cancelled at the HPC backend once, best effort."""
    from pipelines.services.runs import run_cancel

    move_rows(
        modeladmin,
        request,
        queryset,
        to=RunStatus.CANCELLED,
        from_states=set(CANCELLABLE_RUN_STATUSES),
        reason="cancelled by operator",
        verb="Cancelled",
        service=lambda row, *, actor, reason, field: run_cancel(row, actor=actor, reason=reason),
    )


def _set_enabled(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any], enabled: bool
) -> None:
    # ``enabled`` is a switch, not a state machine: one UPDATE is the whole story.
    changed = queryset.exclude(enabled=enabled).update(enabled=enabled, updated_at=timezone.now())
    word = "Enabled" if enabled else "Disabled"
    modeladmin.message_user(
        request, f"{word} {changed} {model_ngettext(modeladmin.opts, changed)}.", messages.SUCCESS
    )


@admin.action(description="Enable selected pipelines", permissions=["change"])
def enable_pipelines(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    _set_enabled(modeladmin, request, queryset, True)


@admin.action(description="Disable selected pipelines", permissions=["change"])
def disable_pipelines(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    _set_enabled(modeladmin, request, queryset, False)


OPERATION_ACTIONS = [reset_failed_to_pending, recover_leases_now]
