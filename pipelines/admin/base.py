"""What every ``pipelines`` admin shares: read-only system and state fields, the state timeline,
bounded read-only inlines and searches that can hit the primary key.

State fields (the keys of ``Model.TRANSITIONS``) are never form fields: in the add form they are
hidden so the model default applies, in the change form they are shown read-only, because the only
writer of a state is ``pipelines.services.states.transition``. A change-form save writes only the
columns the operator changed, so it cannot overwrite a state a worker moved meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import BaseModelAdmin
from django.contrib.admin.utils import get_fields_from_path
from django.core.exceptions import ValidationError
from django.db.models import Model, QuerySet
from django.forms import BaseInlineFormSet, ModelForm
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from pipelines.models import (
    CopyRepair,
    DataLocation,
    DataTransfer,
    DeletionTask,
    ExecutedObsUnit,
    InstrumentModule,
    InstrumentModuleConfiguration,
    LongTermArchiveTransfer,
    PhysicalCopy,
    ReductionSoftwareVersion,
    ReductionStep,
    StagingJob,
    StateEvent,
    StatefulModel,
    SubObservingProgram,
)
from pipelines.services.states import record_creation

# How many events the timeline of a change page shows; the rest are one click away in the
# StateEvent changelist, so a row that flapped a million times still renders fast.
TIMELINE_LIMIT = 50
# How many related rows a read-only inline shows; a package may hold thousands of files.
INLINE_LIMIT = 50

# Columns that only the system writes, wherever a model has them: timestamps, leases, retry
# bookkeeping, idempotency keys and the outcome of the work.
SYSTEM_FIELDS = (
    "created_at",
    "updated_at",
    "lease_owner",
    "lease_expires_at",
    "retry_count",
    "idempotency_key",
    "started_at",
    "finished_at",
    "failure_error_message",
)

# Related models whose ``__str__`` follows a foreign key: their select choices are fetched with
# the join, so a change form does one query per select instead of one per option.
_CHOICE_JOINS: dict[type[Model], tuple[str, ...]] = {
    DataLocation: ("site",),
    InstrumentModule: ("instrument",),
    InstrumentModuleConfiguration: ("instrument_module__instrument",),
    SubObservingProgram: ("observing_program",),
    ReductionSoftwareVersion: ("software",),
    ReductionStep: ("pipeline",),
    ExecutedObsUnit: ("obs_unit",),
    PhysicalCopy: ("location__site",),
    DataTransfer: ("data_transfer_package", "origin_location__site", "destination_location__site"),
    LongTermArchiveTransfer: (
        "raw_data_package",
        "origin_location__site",
        "destination_location__site",
    ),
    StagingJob: ("user", "destination_location__site"),
    DeletionTask: ("physical_copy__location__site",),
    CopyRepair: ("physical_copy__location__site",),
}


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(num_bytes: int | None) -> str:
    """A byte count as people read it next to the exact number: ``65,536 (64.0 KiB)``;
    ``512 bytes`` below one KiB; ``-`` for no value."""
    if num_bytes is None:
        return "-"
    if abs(num_bytes) < 1024:
        return f"{num_bytes:,} bytes"
    scaled = num_bytes / 1024
    index = 0
    while abs(scaled) >= 1024 and index < len(_UNITS) - 1:
        scaled /= 1024
        index += 1
    return f"{num_bytes:,} ({scaled:.1f} {_UNITS[index]})"


def size_column(field: str) -> Callable[[Any, Model], str]:
    """An admin method showing the byte count ``field`` with ``human_size``, sorted by the
    field."""

    @admin.display(description=field.replace("_", " "), ordering=field)
    def show(model_admin: Any, obj: Model) -> str:
        return human_size(getattr(obj, field))

    return show


# Byte-count columns of the ops-db -> the ReadableSizes method that shows them. Lists and
# inlines name the method; a change form shows it wherever the field is read-only (see
# ``OpsModelAdmin.get_readonly_fields``).
SIZE_COLUMNS: dict[str, str] = {
    name: f"{name}_readable"
    for name in (
        "size",
        "size_bytes",
        "capacity_bytes",
        "bytes_transferred",
        "used_bytes",
        "free_bytes",
        "total_bytes",
    )
}


class ReadableSizes:
    """The ``SIZE_COLUMNS`` methods, for admins and inlines."""

    size_readable = size_column("size")
    size_bytes_readable = size_column("size_bytes")
    capacity_bytes_readable = size_column("capacity_bytes")
    bytes_transferred_readable = size_column("bytes_transferred")
    used_bytes_readable = size_column("used_bytes")
    free_bytes_readable = size_column("free_bytes")
    total_bytes_readable = size_column("total_bytes")


def admin_actor(request: HttpRequest) -> str:
    """The ``actor`` recorded on events caused by an admin user."""
    return f"admin:{request.user.get_username()}"


def state_fields(model: type[Model]) -> list[str]:
    """The state fields of ``model`` (empty for models without a state machine)."""
    if issubclass(model, StatefulModel):
        return list(model.TRANSITIONS)
    return []


def _model_field_names(model: type[Model]) -> set[str]:
    return {f.name for f in model._meta.get_fields()}


def _dedupe(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


class JoinedRelatedFieldListFilter(admin.RelatedFieldListFilter):
    """A related-object filter whose choices are fetched with the joins their labels need
    (``DataLocation`` shows its site), instead of one query per choice."""

    def field_choices(self, field: Any, request: HttpRequest, model_admin: Any) -> Any:
        related = field.related_model
        queryset = related._default_manager.complex_filter(field.get_limit_choices_to())
        queryset = queryset.select_related(*_CHOICE_JOINS.get(related, ()))
        ordering = self.field_admin_ordering(field, request, model_admin)
        if ordering:
            queryset = queryset.order_by(*ordering)
        return [(obj.pk, str(obj)) for obj in queryset]


class ChoiceJoinsMixin(BaseModelAdmin):
    """Fetch select and multi-select choices with the joins their labels need."""

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        joins = _CHOICE_JOINS.get(db_field.related_model)
        if joins and "queryset" not in kwargs and db_field.name not in self.raw_id_fields:
            kwargs["queryset"] = db_field.related_model._default_manager.select_related(*joins)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        joins = _CHOICE_JOINS.get(db_field.related_model)
        if joins and "queryset" not in kwargs and db_field.name not in self.raw_id_fields:
            kwargs["queryset"] = db_field.related_model._default_manager.select_related(*joins)
        return super().formfield_for_manytomany(db_field, request, **kwargs)


def _explained(model: type[Model]) -> bool:
    """Whether ``manage.py why`` explains rows of ``model`` (its change page then says why)."""
    from pipelines.services.why import EXPLAINERS, KINDS

    return model in EXPLAINERS or model in KINDS.values()


class OpsModelAdmin(ReadableSizes, ChoiceJoinsMixin, admin.ModelAdmin):
    """Base admin for ops-db models.

    Subclasses list extra system-written columns in ``system_fields`` (read-only on change,
    absent from the add form) and identity columns in ``change_readonly_fields`` (editable when
    a row is added, read-only afterwards). Inlines that are read-only are left out of the add
    page: a new row has no related rows yet.
    """

    system_fields: Sequence[str] = ()
    change_readonly_fields: Sequence[str] = ()
    list_per_page = 50

    # --- fields ----------------------------------------------------------------------------------
    def _locked_fields(self) -> list[str]:
        present = _model_field_names(self.model)
        common = [name for name in SYSTEM_FIELDS if name in present]
        return _dedupe([*common, *self.system_fields, *state_fields(self.model)])

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> list[str]:
        fields = [*super().get_readonly_fields(request, obj), *self._locked_fields()]
        if obj is not None:
            fields += list(self.change_readonly_fields)
            if _explained(self.model):
                fields.append("why")
            if state_fields(self.model):
                fields.append("timeline")
        # A read-only byte count is shown as "65,536 (64.0 KiB)"; get_exclude drops the field.
        return _dedupe(SIZE_COLUMNS.get(name, name) for name in fields)

    def get_exclude(self, request: HttpRequest, obj: Model | None = None) -> Any:
        shown = set(self.get_readonly_fields(request, obj))
        sizes = [name for name, column in SIZE_COLUMNS.items() if column in shown]
        if not sizes:
            return super().get_exclude(request, obj)
        return _dedupe([*(super().get_exclude(request, obj) or ()), *sizes])

    def get_fields(self, request: HttpRequest, obj: Model | None = None) -> Any:
        fields = list(super().get_fields(request, obj))
        if obj is None:
            hidden = set(self.get_readonly_fields(request, None))
            fields = [name for name in fields if name not in hidden]
        return fields

    def get_fieldsets(self, request: HttpRequest, obj: Model | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is not None or not self.fieldsets:
            return fieldsets
        # Declared fieldsets name system fields; the add form leaves them to their defaults.
        hidden = set(self.get_readonly_fields(request, None))
        trimmed = []
        for title, options in fieldsets:
            names = [name for name in options["fields"] if name not in hidden]
            if names:
                trimmed.append((title, {**options, "fields": names}))
        return trimmed

    def get_inlines(self, request: HttpRequest, obj: Model | None) -> list[Any]:
        inlines = list(super().get_inlines(request, obj))
        if obj is None:
            inlines = [i for i in inlines if not issubclass(i, ReadOnlyTabularInline)]
        return inlines

    def get_list_filter(self, request: HttpRequest) -> Any:
        filters: list[Any] = []
        for spec in super().get_list_filter(request):
            if isinstance(spec, str):
                field = get_fields_from_path(self.model, spec)[-1]
                if field.is_relation and field.related_model in _CHOICE_JOINS:
                    spec = (spec, JoinedRelatedFieldListFilter)
            filters.append(spec)
        return filters

    # --- saving ----------------------------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: Any, form: ModelForm, change: bool) -> None:
        """Add: save and record one creation event per state field (actor ``admin:<user>``).
        Change: write only the columns the form changed, never a state field, so a transition
        a worker made while the form was open survives."""
        if not change:
            super().save_model(request, obj, form, change)
            for field in state_fields(self.model):
                record_creation(
                    obj, actor=admin_actor(request), reason="created in the admin", field=field
                )
            return
        concrete = {f.name for f in self.model._meta.concrete_fields}
        locked = set(state_fields(self.model))
        changed = [n for n in form.changed_data if n in concrete and n not in locked]
        if not changed:
            return
        if "updated_at" in concrete:
            changed.append("updated_at")
        obj.save(update_fields=changed)

    # --- search ----------------------------------------------------------------------------------
    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        """The declared text search, plus an exact primary-key match when the term is a valid
        key (an id or UUID pasted from a log), which uses the index instead of a text scan."""
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if not term or not self.get_search_fields(request):
            return results, may_have_duplicates
        try:
            key = self.model._meta.pk.to_python(term)
        except ValidationError:
            return results, may_have_duplicates
        return results | queryset.filter(pk=key), may_have_duplicates

    # --- why ---------------------------------------------------------------------------------
    @admin.display(description="Why")
    def why(self, obj: Model) -> str:
        """The sentence ``manage.py why`` prints for ``obj``: what it waits for or what blocks
        it (pipelines.services.why)."""
        from pipelines.services.why import why_sentence

        return why_sentence(obj)

    # --- timeline --------------------------------------------------------------------------------
    @admin.display(description="Timeline")
    def timeline(self, obj: Model) -> str:
        """The newest ``TIMELINE_LIMIT`` state events of ``obj`` as an escaped HTML table."""
        events = list(StateEvent.objects.for_object(obj)[: TIMELINE_LIMIT + 1])
        if not events:
            return "No state changes recorded."
        more = ""
        if len(events) > TIMELINE_LIMIT:
            events = events[:TIMELINE_LIMIT]
            query = urlencode({"entity": obj._meta.db_table, "object_id": str(obj.pk)})
            url = f"{reverse('admin:pipelines_stateevent_changelist')}?{query}"
            more = format_html(
                '<p>Showing the newest {}. <a href="{}">All events</a></p>', TIMELINE_LIMIT, url
            )
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{} &rarr; {}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    timezone.localtime(event.created_at).strftime("%Y-%m-%d %H:%M:%S %Z"),
                    event.field,
                    event.from_state or "(created)",
                    event.to_state,
                    event.actor,
                    event.reason,
                )
                for event in events
            ),
        )
        return format_html(
            '<table class="state-timeline"><thead><tr><th>When</th><th>Field</th>'
            "<th>Change</th><th>Actor</th><th>Reason</th></tr></thead><tbody>{}</tbody></table>{}",
            rows,
            more,
        )


class BoundedInlineFormSet(BaseInlineFormSet):
    """An inline formset that loads at most ``INLINE_LIMIT`` related rows (in the related
    model's default order), so a read-only inline of a huge relation stays one small query."""

    def get_queryset(self) -> QuerySet[Any]:
        if not hasattr(self, "_bounded_queryset"):
            self._bounded_queryset = super().get_queryset()[:INLINE_LIMIT]
        return self._bounded_queryset


class ReadOnlyTabularInline(ReadableSizes, admin.TabularInline):
    """A view-only inline: no add, change or delete, at most ``INLINE_LIMIT`` rows, each with a
    link to its own change page. Left out of add pages (see ``OpsModelAdmin.get_inlines``)."""

    formset = BoundedInlineFormSet
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    # Joins for the columns and row labels shown, so 50 rows stay one query.
    select_related: Sequence[str] = ()

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        if self.select_related:
            queryset = queryset.select_related(*self.select_related)
        return queryset

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


class OpsTabularInline(ChoiceJoinsMixin, admin.TabularInline):
    """An editable inline for small relations (steps of a pipeline, modules of an instrument)."""

    extra = 0
    show_change_link = True


def changelist_link(model: type[Model], label: str, **filters: Any) -> str:
    """A link to the admin changelist of ``model`` filtered by ``filters``."""
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, urlencode(filters), label)
