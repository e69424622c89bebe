"""Admin for the append-only state event log: list and detail views only, for everyone."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from pipelines.models import StateEvent, StatefulModel

from .base import OpsModelAdmin


def _stateful_models() -> list[type[StatefulModel]]:
    from django.apps import apps

    return [
        model
        for model in apps.get_app_config("pipelines").get_models()
        if issubclass(model, StatefulModel)
    ]


class _ChoicesFilter(admin.SimpleListFilter):
    """A filter whose choices come from the code, not from ``SELECT DISTINCT`` over a table
    with millions of rows."""

    def choices_from_models(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return self.choices_from_models()

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value:
            return queryset.filter(**{str(self.parameter_name): value})
        return queryset


class EntityFilter(_ChoicesFilter):
    title = "table"
    parameter_name = "entity"

    def choices_from_models(self) -> list[tuple[str, str]]:
        return sorted({(m._meta.db_table, str(m._meta.verbose_name)) for m in _stateful_models()})


class FieldFilter(_ChoicesFilter):
    title = "state field"
    parameter_name = "field"

    def choices_from_models(self) -> list[tuple[str, str]]:
        names = {name for m in _stateful_models() for name in m.TRANSITIONS}
        return [(name, name) for name in sorted(names)]


class ToStateFilter(_ChoicesFilter):
    title = "to state"
    parameter_name = "to_state"

    def choices_from_models(self) -> list[tuple[str, str]]:
        states = {
            str(state)
            for m in _stateful_models()
            for table in m.TRANSITIONS.values()
            for state in table
        }
        return [(state, state) for state in sorted(states)]


@admin.register(StateEvent)
class StateEventAdmin(OpsModelAdmin):
    """State events may be looked at, never added, changed or deleted (not even by a superuser):
    they are the evidence of what happened. No actions, so "delete selected" is never offered."""

    list_display = (
        "created_at",
        "entity",
        "object_id",
        "field",
        "from_state",
        "to_state",
        "actor",
        "reason",
    )
    list_filter = (EntityFilter, FieldFilter, ToStateFilter)
    # object_id is matched exactly so a pasted id uses the (entity, object_id) index.
    search_fields = ("object_id__exact", "actor", "reason")
    date_hierarchy = "created_at"
    ordering = ("-created_at", "-id")
    show_full_result_count = False
    actions = None

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False
