"""Admin for the reduction configuration: read-only. Changes go through the configuration page
or ``manage.py reduction_config`` so that every one is validated, audited, versioned and
rendered into the installed script; an admin edit of a row would skip all four."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from reduction.models import ParameterSet, PropertyModification, ReductionProperty


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        """The text search plus an exact id match, so an id pasted from a log or a run finds
        its row (the same convention as the pipelines admin)."""
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term.isdigit():
            results = results | queryset.filter(pk=int(term))
        return results, may_have_duplicates


@admin.register(ReductionProperty)
class ReductionPropertyAdmin(ReadOnlyAdmin):
    list_display = ("instrument", "key", "value", "updated_at")
    list_filter = ("instrument",)
    search_fields = ("key",)


@admin.register(ParameterSet)
class ParameterSetAdmin(ReadOnlyAdmin):
    list_display = ("instrument", "number", "action", "author", "created_at", "script_checksum")
    list_filter = ("instrument", "action")
    search_fields = ("comment", "script_checksum", "author__username")
    raw_id_fields = ("author",)
    date_hierarchy = "created_at"


@admin.register(PropertyModification)
class PropertyModificationAdmin(ReadOnlyAdmin):
    list_display = ("property", "parameter_set", "user", "modified_at", "old_value", "new_value")
    list_filter = ("property__instrument", "user")
    search_fields = ("property__key", "user__username")
    raw_id_fields = ("property", "parameter_set", "user")
    list_select_related = ("property", "parameter_set", "user")
