"""The Django admin: every registered model of our apps answers for each role, filters and
search work, state fields are never form fields, and actions move states only through
``transition()`` with an event naming the admin user."""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any

import pytest
from django.contrib import admin, messages
from django.contrib.admin.filters import AllValuesFieldListFilter
from django.contrib.messages import get_messages
from django.db import connection, models
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from factory.django import DjangoModelFactory

from access import OPERATORS, VIEWERS, ensure_groups
from pipelines import models as m
from pipelines.admin.base import SYSTEM_FIELDS, TIMELINE_LIMIT, state_fields
from pipelines.services.states import transition
from tests import factories

OUR_APPS = ("pipelines", "reduction")

# Tables that grow with the data; their admins must not count everything or render selects
# with every row.
BIG_MODELS = (
    m.RawDataFile,
    m.RawDataPackage,
    m.PhysicalCopy,
    m.DataTransfer,
    m.LongTermArchiveTransfer,
    m.DeletionTask,
    m.ExecutedReductionStep,
    m.DataProduct,
    m.StateEvent,
    m.ExecutedObsUnit,
)

OPERATION_MODELS = (
    m.RawDataPackage,
    m.DataTransferPackage,
    m.DataTransfer,
    m.LongTermArchiveTransfer,
    m.StagingJob,
    m.DeletionTask,
)


def _registered_models() -> list[type[models.Model]]:
    # Read at collection time, so models another app registers later are covered too.
    return sorted(
        (model for model in admin.site._registry if model._meta.app_label in OUR_APPS),
        key=lambda model: model._meta.label,
    )


REGISTERED = _registered_models()


def _label(model: type[models.Model]) -> str:
    return model._meta.label


def factory_for(model: type[models.Model]) -> type[DjangoModelFactory]:
    for _, obj in inspect.getmembers(factories, inspect.isclass):
        if (
            issubclass(obj, DjangoModelFactory)
            and obj is not DjangoModelFactory
            and obj._meta.model is model
        ):
            return obj
    raise LookupError(f"tests/factories.py has no factory for {model._meta.label}")


def _url(model: type[models.Model], view: str, *args: Any) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def _client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _messages(response: Any) -> list[tuple[int, str]]:
    return [(msg.level, str(msg)) for msg in get_messages(response.wsgi_request)]


def _run_action(client: Client, model: type[models.Model], action: str, rows: list[Any]) -> Any:
    return client.post(
        _url(model, "changelist"),
        {"action": action, "_selected_action": [str(row.pk) for row in rows], "index": 0},
    )


@pytest.fixture
def groups(db: None) -> dict[str, Any]:
    return ensure_groups()


@pytest.fixture
def operator(groups: dict[str, Any]) -> Any:
    user = factories.UserFactory(username="olga", is_staff=True)
    user.groups.add(groups[OPERATORS])
    return user


@pytest.fixture
def viewer(groups: dict[str, Any]) -> Any:
    user = factories.UserFactory(username="victor", is_staff=True)
    user.groups.add(groups[VIEWERS])
    return user


@pytest.fixture
def operator_client(operator: Any) -> Client:
    return _client_for(operator)


@pytest.fixture
def viewer_client(viewer: Any) -> Client:
    return _client_for(viewer)


def _request_as(user: Any) -> Any:
    request = RequestFactory().get("/admin/")
    request.user = user
    return request


# --- every model, every role ---------------------------------------------------------------------
def test_every_model_of_the_pipelines_app_is_registered():
    from django.apps import apps

    missing = [
        model.__name__
        for model in apps.get_app_config("pipelines").get_models()
        if model not in admin.site._registry
    ]
    assert missing == []


@pytest.mark.django_db
@pytest.mark.parametrize("model", REGISTERED, ids=_label)
def test_operator_opens_changelist_add_and_change_pages(model, operator, operator_client):
    obj = factory_for(model)()
    model_admin = admin.site._registry[model]

    assert operator_client.get(_url(model, "changelist")).status_code == 200

    add = operator_client.get(_url(model, "add"))
    if model is m.StateEvent:
        assert add.status_code == 403
    elif model_admin.has_add_permission(_request_as(operator)):
        assert add.status_code == 200
    else:
        assert add.status_code == 403

    change = operator_client.get(_url(model, "change", obj.pk))
    assert change.status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("model", REGISTERED, ids=_label)
def test_superuser_opens_every_changelist(model):
    factory_for(model)()
    superuser = factories.UserFactory(username="root", is_staff=True, is_superuser=True)
    assert _client_for(superuser).get(_url(model, "changelist")).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("model", REGISTERED, ids=_label)
def test_viewer_may_look_but_not_add(model, viewer_client):
    obj = factory_for(model)()
    assert viewer_client.get(_url(model, "changelist")).status_code == 200
    assert viewer_client.get(_url(model, "change", obj.pk)).status_code == 200
    assert viewer_client.get(_url(model, "add")).status_code == 403


@pytest.mark.django_db
def test_viewer_is_offered_no_actions(viewer):
    model_admin = admin.site._registry[m.RawDataPackage]
    assert model_admin.get_actions(_request_as(viewer)) == {}


@pytest.mark.django_db
@pytest.mark.parametrize("model", REGISTERED, ids=_label)
def test_search_and_every_filter_answer(model, operator_client):
    obj = factory_for(model)()
    model_admin = admin.site._registry[model]
    url = _url(model, "changelist")

    assert operator_client.get(url, {"q": "x"}).status_code == 200
    if model_admin.search_fields:
        # A pasted primary key finds its row.
        found = operator_client.get(url, {"q": str(obj.pk)})
        assert found.status_code == 200
        assert obj.pk in [row.pk for row in found.context["cl"].result_list]

    page = operator_client.get(url)
    cl = page.context["cl"]
    # Filters with nothing to offer for this data are not shown; every shown one is exercised.
    for spec in cl.filter_specs:
        choices = [c for c in spec.choices(cl) if not c["selected"]]
        # A filter with choices offers at least "All" plus one value; try a few values each.
        for choice in choices[:4]:
            response = operator_client.get(url + choice["query_string"])
            # An unknown lookup makes the admin redirect with ?e=1 instead of answering.
            assert response.status_code == 200, (spec.title, choice["query_string"])

    if model_admin.date_hierarchy:
        year = timezone.now().year
        response = operator_client.get(url, {f"{model_admin.date_hierarchy}__year": year})
        assert response.status_code == 200


PIPELINES_REGISTERED = [model for model in REGISTERED if model._meta.app_label == "pipelines"]


def _changelist_queries(client: Client, model: type[models.Model]) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(_url(model, "changelist")).status_code == 200
    return len(queries)


@pytest.mark.django_db
@pytest.mark.parametrize("model", PIPELINES_REGISTERED, ids=_label)
def test_changelist_queries_do_not_grow_with_rows(model, operator_client):
    factory = factory_for(model)
    factory()
    _changelist_queries(operator_client, model)  # fills process-wide caches
    one_row = _changelist_queries(operator_client, model)
    # Each factory row brings its own parents (locations, sites, steps), so this also covers
    # the labels of filter choices, not only the columns.
    factory.create_batch(3)
    assert _changelist_queries(operator_client, model) == one_row


def _children_of_package(package: Any) -> None:
    factories.RawDataFileFactory(raw_data_package=package)
    factories.PhysicalCopyFactory(raw_data_package=package)


def _children_of_bundle(bundle: Any) -> None:
    factories.RawDataPackageFactory(data_transfer_package=bundle)
    factories.DataTransferFactory(data_transfer_package=bundle)
    factories.PhysicalCopyFactory(
        kind="data_transfer_package", raw_data_package=None, data_transfer_package=bundle
    )


# Parents whose change page shows read-only inlines, and how to add one child to each inline.
INLINE_PARENTS = {
    m.RawDataPackage: _children_of_package,
    m.DataTransferPackage: _children_of_bundle,
    m.RawDataFile: lambda f: factories.PhysicalCopyFactory(
        kind="raw_data_file", raw_data_package=None, raw_data_file=f
    ),
    m.DataTransfer: lambda t: factories.DataTransferLogFactory(data_transfer=t),
    m.ReductionStep: lambda s: factories.ExecutedReductionStepFactory(reduction_step=s),
    m.ExecutedReductionStep: lambda r: factories.DataProductFactory(produced_by=r),
    m.ExecutedObsUnit: lambda e: factories.RawDataPackageFactory(executed_obs_unit=e),
    m.PhysicalCopy: lambda c: factories.DeletionTaskFactory(physical_copy=c, status="completed"),
}


@pytest.mark.django_db
@pytest.mark.parametrize("model", list(INLINE_PARENTS), ids=_label)
def test_change_page_queries_do_not_grow_with_inline_rows(model, operator_client):
    parent = factory_for(model)()
    add_children = INLINE_PARENTS[model]
    add_children(parent)
    url = _url(model, "change", parent.pk)
    # The first request fills process-wide caches (content types); measure after it.
    operator_client.get(url)

    with CaptureQueriesContext(connection) as first:
        assert operator_client.get(url).status_code == 200
    for _ in range(3):
        add_children(parent)
    with CaptureQueriesContext(connection) as second:
        page = operator_client.get(url)
    assert page.status_code == 200
    assert len(second) == len(first)


# --- declarative configuration -------------------------------------------------------------------
@pytest.mark.parametrize("model", BIG_MODELS, ids=_label)
def test_big_tables_skip_full_counts_and_distinct_filters(model):
    model_admin = admin.site._registry[model]
    assert model_admin.show_full_result_count is False
    # AllValuesFieldListFilter runs SELECT DISTINCT over the whole table on every page load.
    for spec in model_admin.list_filter:
        if isinstance(spec, str):
            field = model._meta.get_field(spec.split("__")[0])
            if "__" not in spec and not field.is_relation:
                assert field.choices or isinstance(field, models.BooleanField), spec
        else:
            assert not (isinstance(spec, type) and issubclass(spec, AllValuesFieldListFilter))


@pytest.mark.parametrize("model", PIPELINES_REGISTERED, ids=_label)
def test_relations_to_big_tables_use_raw_id_widgets(model):
    model_admin = admin.site._registry[model]
    readonly_on_change = {
        *model_admin.change_readonly_fields,
        *model_admin.system_fields,
        *model_admin.readonly_fields,
    }
    for field in model._meta.get_fields():
        if not (field.concrete and field.is_relation and field.related_model in BIG_MODELS):
            continue
        if not getattr(field, "editable", True):
            continue
        assert field.name in model_admin.raw_id_fields or field.name in readonly_on_change, (
            f"{model.__name__}.{field.name} would render a select of every row"
        )


STATEFUL = [model for model in REGISTERED if state_fields(model)]


@pytest.mark.django_db
@pytest.mark.parametrize("model", STATEFUL, ids=_label)
def test_state_and_system_fields_are_never_form_fields(model, operator):
    obj = factory_for(model)()
    model_admin = admin.site._registry[model]
    request = _request_as(operator)
    present = {f.name for f in model._meta.get_fields()}
    locked = {*state_fields(model), *(name for name in SYSTEM_FIELDS if name in present)}

    change_form = model_admin.get_form(request, obj, change=True)
    assert locked.isdisjoint(change_form.base_fields)
    assert set(state_fields(model)) <= set(model_admin.get_readonly_fields(request, obj))
    assert "timeline" in model_admin.get_readonly_fields(request, obj)

    add_fields = model_admin.get_fields(request, None)
    add_form = model_admin.get_form(request, None, fields=add_fields)
    assert locked.isdisjoint(add_form.base_fields)
    # Not even shown read-only on the add page: the default state simply applies.
    assert locked.isdisjoint(add_fields)


# --- add, change, timeline -----------------------------------------------------------------------
@pytest.mark.django_db
def test_adding_a_package_records_its_creation_events(operator_client):
    scan = factories.ExecutedObsUnitFactory()
    module = factories.InstrumentModuleFactory()
    response = operator_client.post(
        _url(m.RawDataPackage, "add"),
        {
            "name": "admin_made.tar",
            "relative_path": "packages/admin_made.tar",
            "executed_obs_unit": str(scan.pk),
            "instrument_module": str(module.pk),
            "origin_location": "",
            "data_transfer_package": "",
            "size": "0",
            "file_count": "0",
            "checksum": "",
            "checksum_algorithm": "sha256",
            "max_retries": "3",
            "metadata": "{}",
            # Editing status through the form is not possible; a posted value is ignored.
            "status": "completed",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors

    package = m.RawDataPackage.objects.get(name="admin_made.tar")
    assert (package.status, package.state) == ("pending", "waiting")
    events = {
        (e.field, e.from_state, e.to_state, e.actor)
        for e in m.StateEvent.objects.for_object(package)
    }
    assert events == {
        ("status", "", "pending", "admin:olga"),
        ("state", "", "waiting", "admin:olga"),
    }


@pytest.mark.django_db
def test_a_change_form_save_keeps_a_state_moved_meanwhile(operator):
    package = factories.RawDataPackageFactory()
    stale = m.RawDataPackage.objects.get(pk=package.pk)
    # A worker claims the package while the operator's form is open.
    transition(package, "scheduled", actor="packaging-manager", reason="claimed")

    model_admin = admin.site._registry[m.RawDataPackage]
    request = _request_as(operator)
    form_class = model_admin.get_form(request, stale, change=True)
    data = {**form_class(instance=stale).initial, "relative_path": "packages/renamed.tar"}
    data = {k: ("" if v is None else v) for k, v in data.items()}
    data["metadata"] = "{}"
    form = form_class(data=data, instance=stale)
    assert form.is_valid(), form.errors
    model_admin.save_model(request, form.save(commit=False), form, change=True)

    package.refresh_from_db()
    assert package.relative_path == "packages/renamed.tar"
    assert package.status == "scheduled"


@pytest.mark.django_db
def test_timeline_lists_the_events_of_the_object_escaped(operator_client):
    package = factories.RawDataPackageFactory()
    other = factories.RawDataPackageFactory()
    transition(package, "scheduled", actor="packaging-manager", reason="claimed <b>by</b> tick 7")
    transition(other, "scheduled", actor="someone-else", reason="not this one")

    page = operator_client.get(_url(m.RawDataPackage, "change", package.pk)).content.decode()
    assert "Timeline" in page
    assert "packaging-manager" in page
    assert "claimed &lt;b&gt;by&lt;/b&gt; tick 7" in page
    assert "someone-else" not in page


@pytest.mark.django_db
def test_timeline_is_capped_and_links_to_all_events(operator_client):
    package = factories.RawDataPackageFactory()
    for n in range(TIMELINE_LIMIT // 2 + 1):
        transition(package, "scheduled", actor="manager", reason=f"claim {n}")
        transition(package, "pending", actor="recovery", reason=f"lease expired {n}")

    page = operator_client.get(_url(m.RawDataPackage, "change", package.pk)).content.decode()
    assert page.count("<tr><td>") == TIMELINE_LIMIT
    assert f"Showing the newest {TIMELINE_LIMIT}" in page
    assert f"object_id={package.pk}" in page
    # The newest event is shown, the oldest one is cut.
    assert f"lease expired {TIMELINE_LIMIT // 2}" in page
    assert "claim 0<" not in page


@pytest.mark.django_db
def test_read_only_inline_shows_files_of_a_package(operator_client):
    package = factories.RawDataPackageFactory()
    factories.RawDataFileFactory(raw_data_package=package, name="inside.fits")
    factories.RawDataFileFactory(name="elsewhere.fits")

    page = operator_client.get(_url(m.RawDataPackage, "change", package.pk)).content.decode()
    assert "raw/inside.fits" in page
    assert "raw/elsewhere.fits" not in page


@pytest.mark.django_db
def test_read_only_inlines_are_bounded(operator_client, monkeypatch):
    monkeypatch.setattr("pipelines.admin.base.INLINE_LIMIT", 2)
    package = factories.RawDataPackageFactory()
    for name in ("a.fits", "b.fits", "c.fits"):
        factories.RawDataFileFactory(raw_data_package=package, name=name)

    page = operator_client.get(_url(m.RawDataPackage, "change", package.pk)).content.decode()
    # Files are in path order; the third is only reachable through the "all files" link.
    assert "raw/a.fits" in page and "raw/b.fits" in page
    assert "raw/c.fits" not in page
    assert f"raw_data_package__id__exact={package.pk}" in page


@pytest.mark.django_db
def test_read_only_inlines_are_left_off_the_add_page(operator_client):
    page = operator_client.get(_url(m.RawDataPackage, "add"))
    assert page.status_code == 200
    assert page.context["inline_admin_formsets"] == []


# --- actions -------------------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("model", OPERATION_MODELS, ids=_label)
def test_reset_moves_failed_rows_to_pending_and_leaves_others(model, operator_client):
    factory = factory_for(model)
    failed = factory(status="failed", retry_count=3, failure_error_message="disk full")
    completed = factory(status="completed")

    response = _run_action(operator_client, model, "reset_failed_to_pending", [failed, completed])
    assert response.status_code == 302

    failed.refresh_from_db()
    completed.refresh_from_db()
    assert (failed.status, failed.retry_count, failed.failure_error_message) == ("pending", 0, "")
    assert completed.status == "completed"

    event = m.StateEvent.objects.for_object(failed).get()
    assert (event.from_state, event.to_state, event.actor) == ("failed", "pending", "admin:olga")
    assert event.reason == "operator reset"
    assert not m.StateEvent.objects.for_object(completed).exists()

    notes = _messages(response)
    warnings = [text for level, text in notes if level == messages.WARNING]
    assert any(str(completed) in text and "completed" in text for text in warnings), notes
    assert any(level == messages.SUCCESS and " 1 " in text for level, text in notes), notes


@pytest.mark.django_db
def test_reset_of_package_state_moves_failed_to_waiting(operator_client):
    failed = factories.RawDataPackageFactory(state="failed")
    archived = factories.RawDataPackageFactory(state="archived")

    response = _run_action(
        operator_client, m.RawDataPackage, "reset_failed_package_state", [failed, archived]
    )

    failed.refresh_from_db()
    archived.refresh_from_db()
    assert failed.state == "waiting"
    assert archived.state == "archived"
    event = m.StateEvent.objects.for_object(failed).get()
    assert (event.field, event.to_state, event.actor) == ("state", "waiting", "admin:olga")
    assert any(
        level == messages.WARNING and archived.name in text for level, text in _messages(response)
    )


@pytest.mark.django_db
def test_reset_of_unpacking_moves_only_unpack_status(operator_client):
    transfer = factories.DataTransferFactory(
        status="completed", unpack_status="failed", unpack_retry_count=3
    )

    _run_action(operator_client, m.DataTransfer, "reset_failed_unpacking", [transfer])

    transfer.refresh_from_db()
    assert (transfer.status, transfer.unpack_status) == ("completed", "pending")
    assert transfer.unpack_retry_count == 0
    event = m.StateEvent.objects.for_object(transfer).get()
    assert (event.field, event.from_state, event.to_state) == ("unpack_status", "failed", "pending")


@pytest.mark.django_db
def test_recover_expired_leases_now_hands_back_a_dead_claim(operator_client):
    stuck = factories.LongTermArchiveTransferFactory(
        status="in_progress",
        lease_owner="worker@dead-host",
        lease_expires_at=timezone.now() - timedelta(minutes=5),
    )
    healthy = factories.LongTermArchiveTransferFactory(
        status="in_progress",
        lease_owner="worker@live-host",
        lease_expires_at=timezone.now() + timedelta(minutes=5),
    )

    response = _run_action(
        operator_client, m.LongTermArchiveTransfer, "recover_leases_now", [healthy]
    )

    stuck.refresh_from_db()
    healthy.refresh_from_db()
    assert (stuck.status, stuck.retry_count) == ("pending", 1)
    assert healthy.status == "in_progress"
    event = m.StateEvent.objects.for_object(stuck).get()
    assert event.actor == "admin:olga"
    assert any(
        "Recovered 1 expired lease" in text and "long_term_archive_transfer: 1" in text
        for _, text in _messages(response)
    )


@pytest.mark.django_db
def test_retry_failed_runs_queues_them_again(operator_client):
    failed = factories.ExecutedReductionStepFactory(status="failed", triggered_by="backfill")
    completed = factories.ExecutedReductionStepFactory(status="completed")

    response = _run_action(
        operator_client, m.ExecutedReductionStep, "retry_failed_runs", [failed, completed]
    )

    failed.refresh_from_db()
    completed.refresh_from_db()
    assert (failed.status, failed.triggered_by) == ("pending", "backfill")
    assert completed.status == "completed"
    event = m.StateEvent.objects.for_object(failed).get()
    assert (event.from_state, event.to_state, event.actor) == ("failed", "pending", "admin:olga")
    assert not m.StateEvent.objects.for_object(completed).exists()
    assert any(level == messages.WARNING for level, _ in _messages(response))


@pytest.mark.django_db
def test_retry_is_refused_when_the_sub_group_already_has_an_active_run(operator_client):
    # Failed for good: a failed run awaiting its retry would itself occupy the sub-group.
    failed = factories.ExecutedReductionStepFactory(
        status="failed", failed_for_good=True, sub_group_key="scan-7"
    )
    factories.ExecutedReductionStepFactory(
        reduction_step=failed.reduction_step, sub_group_key="scan-7", status="running"
    )

    response = _run_action(operator_client, m.ExecutedReductionStep, "retry_failed_runs", [failed])

    failed.refresh_from_db()
    assert failed.status == "failed"
    assert not m.StateEvent.objects.for_object(failed).exists()
    assert any(
        level == messages.WARNING and "refused" in text for level, text in _messages(response)
    )


@pytest.mark.django_db
def test_cancel_runs_only_from_cancellable_states(operator_client):
    pending = factories.ExecutedReductionStepFactory(status="pending")
    running = factories.ExecutedReductionStepFactory(status="running")
    collecting = factories.ExecutedReductionStepFactory(status="collecting_results")

    response = _run_action(
        operator_client, m.ExecutedReductionStep, "cancel_runs", [pending, running, collecting]
    )

    for run in (pending, running, collecting):
        run.refresh_from_db()
    assert (pending.status, running.status) == ("cancelled", "cancelled")
    assert pending.finished_at is not None
    assert collecting.status == "collecting_results"
    assert not m.StateEvent.objects.for_object(collecting).exists()
    assert m.StateEvent.objects.for_object(running).get().actor == "admin:olga"
    warnings = [text for level, text in _messages(response) if level == messages.WARNING]
    assert any("collecting_results" in text for text in warnings)


@pytest.mark.django_db
def test_pipelines_are_enabled_and_disabled(operator_client):
    on = factories.PipelineFactory(enabled=True)
    off = factories.PipelineFactory(enabled=False)

    _run_action(operator_client, m.Pipeline, "disable_pipelines", [on, off])
    assert list(m.Pipeline.objects.filter(enabled=True)) == []

    response = _run_action(operator_client, m.Pipeline, "enable_pipelines", [on])
    on.refresh_from_db()
    off.refresh_from_db()
    assert (on.enabled, off.enabled) == (True, False)
    assert any("Enabled 1 pipeline." in text for _, text in _messages(response))


# --- the event log stays append-only -------------------------------------------------------------
@pytest.mark.django_db
def test_state_events_offer_no_actions_and_refuse_changes(operator, operator_client):
    event = factories.EventFactory()
    superuser = factories.UserFactory(username="root", is_staff=True, is_superuser=True)
    model_admin = admin.site._registry[m.StateEvent]

    for user in (operator, superuser):
        request = _request_as(user)
        assert "delete_selected" not in model_admin.get_actions(request)
        assert not model_admin.has_delete_permission(request, event)
        assert not model_admin.has_change_permission(request, event)

    changelist = operator_client.get(_url(m.StateEvent, "changelist")).content.decode()
    assert 'name="action"' not in changelist

    su_client = _client_for(superuser)
    assert su_client.post(_url(m.StateEvent, "delete", event.pk), {"post": "yes"}).status_code == (
        403
    )
    changed = su_client.post(_url(m.StateEvent, "change", event.pk), {"to_state": "failed"})
    assert changed.status_code == 403
    event.refresh_from_db()
    assert event.to_state == "scheduled"
    assert m.StateEvent.objects.filter(pk=event.pk).exists()


def test_products_and_runs_show_the_parameter_version_that_made_them(operator_client):
    version = factories.ParameterSetFactory(instrument="cncs", number=7)
    run = factories.ExecutedReductionStepFactory(parameter_set=version)
    product = factories.DataProductFactory(produced_by=run)

    listing = operator_client.get(_url(m.DataProduct, "changelist"))
    assert "cncs v7" in listing.content.decode()
    detail = operator_client.get(_url(m.DataProduct, "change", product.pk))
    assert "cncs v7" in detail.content.decode()
    runs = operator_client.get(_url(m.ExecutedReductionStep, "changelist"))
    assert "cncs v7" in runs.content.decode()
    stale = operator_client.get(_url(m.DataProduct, "changelist") + "?stale_since__isempty=0")
    assert stale.status_code == 200 and product.filename not in stale.content.decode()
