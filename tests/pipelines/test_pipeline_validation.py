"""Validation of groupings, pipelines and steps: invalid input gives a clear error naming what is
wrong and nothing is saved, through the model (full_clean), the admin's add and change forms and
the dependency service. Behaviour 16 of the workflow-manager brief (§8) and the bad-input list
of issue 11."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.test import Client
from django.urls import reverse

from access import OPERATORS, ensure_groups
from pipelines.models import DataGrouping, Pipeline, ReductionStep
from pipelines.models.workflow import (
    validate_cron_expression,
    validate_resource_requirements,
    validate_trigger_config,
)
from pipelines.services.pipelines import (
    reduction_step_check_dependencies,
    reduction_step_set_dependencies,
)
from tests.factories import (
    DataGroupingFactory,
    DataLocationFactory,
    PipelineFactory,
    ReductionSoftwareFactory,
    ReductionSoftwareVersionFactory,
    ReductionStepFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


def messages_of(exc: ValidationError) -> str:
    return " | ".join(exc.messages)


def chain(count: int, **pipeline: Any) -> list[ReductionStep]:
    """``count`` steps of one pipeline, each depending on the one before."""
    owner = PipelineFactory(**pipeline)
    steps = [ReductionStepFactory(pipeline=owner, name=f"s{i}") for i in range(count)]
    for before, after in itertools.pairwise(steps):
        reduction_step_set_dependencies(after, [before])
    return steps


# --- behaviour 16: the DAG -----------------------------------------------------------------------
def test_behaviour_16_a_dependency_closing_a_cycle_fails_validation_and_is_not_saved() -> None:
    first, second, third = chain(3)

    with pytest.raises(ValidationError) as raised:
        reduction_step_set_dependencies(first, [third])

    assert "cycle: s0 -> s2 -> s1 -> s0" in messages_of(raised.value)
    assert list(first.depends_on.all()) == []
    assert list(third.depends_on.all()) == [second]


def test_behaviour_16_a_step_depending_on_itself_is_refused() -> None:
    (step,) = chain(1)

    with pytest.raises(ValidationError, match="s0 cannot depend on itself"):
        reduction_step_set_dependencies(step, [step])
    assert not step.depends_on.exists()


def test_behaviour_16_the_models_full_clean_refuses_a_cycle_it_is_about_to_save() -> None:
    first, _second, third = chain(3)
    first.pending_depends_on = [third]  # what a form that edits depends_on hands over

    with pytest.raises(ValidationError) as raised:
        first.full_clean()

    assert "depends_on" in raised.value.message_dict
    assert "cycle" in messages_of(raised.value)


def test_a_valid_dag_with_a_diamond_is_accepted() -> None:
    top, left = chain(2)
    right = ReductionStepFactory(pipeline=top.pipeline, name="right")
    bottom = ReductionStepFactory(pipeline=top.pipeline, name="bottom")
    reduction_step_set_dependencies(right, [top])

    reduction_step_set_dependencies(bottom, [left, right])

    assert set(bottom.depends_on.all()) == {left, right}
    bottom.full_clean()  # the saved links still validate


def test_a_dependency_on_a_step_of_another_pipeline_is_refused() -> None:
    (mine,) = chain(1)
    (theirs,) = chain(1)

    with pytest.raises(ValidationError, match="of another pipeline"):
        reduction_step_set_dependencies(mine, [theirs])
    with pytest.raises(ValidationError, match="of another pipeline"):
        reduction_step_check_dependencies(mine, [theirs])
    assert not mine.depends_on.exists()


def test_moving_a_linked_step_to_another_pipeline_is_refused() -> None:
    upstream, downstream = chain(2)
    elsewhere = PipelineFactory()

    downstream.pipeline = elsewhere
    with pytest.raises(ValidationError, match="another pipeline"):
        downstream.full_clean()
    upstream.pipeline = elsewhere
    with pytest.raises(ValidationError, match=r"s1 depends on s0, so s0 cannot move"):
        upstream.full_clean()


def test_dependencies_of_an_unsaved_step_cannot_be_set() -> None:
    step = ReductionStep(name="new")

    with pytest.raises(ValidationError, match="save new before"):
        reduction_step_set_dependencies(step, [])


# --- group_by and resources ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("group_by", ["scan"], "unknown group_by key 'scan'"),
        ("group_by", "source", "group_by is a list"),
        ("resource_requirements", {"cpus": 4}, "unknown resource 'cpus'; known: cpu"),
        ("resource_requirements", {"cpu": 0}, "cpu must be an integer number of cores from 1"),
        ("resource_requirements", {"cpu": 2.5}, "cpu must be an integer"),
        ("resource_requirements", {"cpu": True}, "cpu must be an integer"),
        ("resource_requirements", {"cpu": 2000}, "to 1024"),
        ("resource_requirements", {"memory_gb": 0}, "memory_gb must be a number of GB above 0"),
        ("resource_requirements", {"memory_gb": 70000}, "at most 65536"),
        ("resource_requirements", {"memory_gb": "16G"}, "memory_gb must be"),
        ("resource_requirements", {"time_hours": 0.001}, "time_hours must be"),
        ("resource_requirements", {"time_hours": 721}, "to 720"),
        ("resource_requirements", {"time_hours": float("nan")}, "time_hours must be"),
        ("resource_requirements", [4, 16], "resource requirements are an object"),
        ("reduction_instrument", "nope", "unknown instrument 'nope'"),
    ],
)
def test_a_step_with_invalid_settings_is_refused_by_full_clean(
    field: str, value: Any, message: str
) -> None:
    step = ReductionStepFactory.build(
        pipeline=PipelineFactory(), software=ReductionSoftwareFactory()
    )
    setattr(step, field, value)

    with pytest.raises(ValidationError) as raised:
        step.full_clean()

    assert field in raised.value.message_dict
    assert message in messages_of(raised.value)


def test_a_steps_version_must_be_of_its_software_and_a_pinned_step_needs_one() -> None:
    step = ReductionStepFactory.build(
        pipeline=PipelineFactory(), software=ReductionSoftwareFactory()
    )
    step.software_version = ReductionSoftwareVersionFactory()  # of another software

    with pytest.raises(ValidationError, match="is not a version of"):
        step.full_clean()
    step.software_version = None
    step.version_policy = "pinned"
    with pytest.raises(ValidationError, match="a PINNED step needs the version it is pinned to"):
        step.full_clean()
    step.software_version = ReductionSoftwareVersionFactory(software=step.software)
    step.full_clean()


def test_resources_within_range_are_accepted() -> None:
    good = {"cpu": 4, "memory_gb": 16, "time_hours": 2}
    assert validate_resource_requirements(good) == good
    assert validate_resource_requirements({"memory_gb": 0.5, "time_hours": 1 / 60}) == {
        "memory_gb": 0.5,
        "time_hours": 1 / 60,
    }
    assert validate_resource_requirements({}) == {}


# --- triggers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("trigger_type", "config", "message"),
    [
        ("cron", {}, 'a CRON pipeline needs {"cron": "<expression>"}'),
        ("cron", {"cron": "61 * * * *"}, "'61 * * * *' is not a cron expression"),
        ("cron", {"cron": "0 3 * *"}, "use 5 fields"),
        ("cron", {"cron": "0 3 * * * 0"}, "use 5 fields"),
        ("cron", {"cron": "@reboot"}, "is not a cron expression"),
        ("cron", {"cron": "0 0 30 2 *"}, "never fires"),
        ("cron", {"cron": 3}, "is text"),
        ("cron", {"cron": "0 3 * * *", "tz": "UTC"}, "unknown key(s) 'tz'"),
        ("cron", ["0 3 * * *"], "an object"),
        ("continuous", {"cron": "0 3 * * *"}, "a CONTINUOUS pipeline takes no cron expression"),
        ("manual", {"cron": "0 3 * * *"}, "a MANUAL pipeline takes no cron expression"),
        ("manual", {"when": "now"}, "takes no trigger configuration"),
    ],
)
def test_a_pipeline_with_an_invalid_trigger_is_refused_by_full_clean(
    trigger_type: str, config: Any, message: str
) -> None:
    pipeline = PipelineFactory.build(
        data_grouping=DataGroupingFactory(),
        processing_location=DataLocationFactory(location_type="processing"),
        trigger_type=trigger_type,
        trigger_config=config,
    )

    with pytest.raises(ValidationError) as raised:
        pipeline.full_clean()

    assert "trigger_config" in raised.value.message_dict
    assert message in messages_of(raised.value)


def test_valid_triggers_are_accepted_and_normalised() -> None:
    assert validate_trigger_config("cron", {"cron": " 0 3 * * * "}) == {"cron": "0 3 * * *"}
    assert validate_trigger_config("cron", {"cron": "@daily"}) == {"cron": "@daily"}
    assert validate_trigger_config("cron", {"cron": "*/15 8-18 * * 1-5"})
    assert validate_trigger_config("continuous", {}) == {}
    assert validate_trigger_config("manual", None) == {}
    assert validate_cron_expression("0 0 29 2 *") == "0 0 29 2 *"  # leap days do come


# --- groupings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("state=archived", "filter rules are a list"),
        (["state"], "rule 1 ('state'): a rule is an object"),
        ([{"table": "Source", "column": "name", "operator": "eq"}], "missing value"),
        (
            [{"table": "Source", "column": "name", "operator": "eq", "value": "a", "x": 1}],
            "unknown key(s) 'x'",
        ),
        (
            [{"table": "RawDataPackage", "column": "state", "operator": "eq", "value": "archivd"}],
            "'archivd' is not one of: waiting, transferring, archived, failed",
        ),
        (
            [{"table": "RawDataPackage", "column": "size", "operator": "gt", "value": "big"}],
            "RawDataPackage.size holds an integer: 'big' is not an integer",
        ),
        (
            [{"table": "ObsUnit", "column": "line_id", "operator": "eq", "value": "CO43"}],
            "to match a Line by name use table Line, column name",
        ),
        (
            [{"table": "ObsUnit", "column": "line", "operator": "eq", "value": 1}],
            "'line' is a link: use line_id for its id, or table Line",
        ),
        (
            [{"table": "Source", "column": "name", "operator": "gt", "value": "M"}],
            "gt does not apply to Source.name (text)",
        ),
        (
            [{"table": "RawDataPackage", "column": "size", "operator": "like", "value": "1%"}],
            "like does not apply to RawDataPackage.size",
        ),
        (
            [{"table": "Source", "column": "name", "operator": "like", "value": "NGC\\"}],
            "cannot end with the escape character",
        ),
        (
            [{"table": "Source", "column": "name", "operator": "in", "value": []}],
            "in needs a non-empty list",
        ),
        (
            [{"table": "Source", "column": "name", "operator": "in", "value": ["a", 2]}],
            "2 is not text",
        ),
        (
            [{"table": "RawDataPackage", "column": "metadata", "operator": "eq", "value": 1}],
            "is a JSON column: give a json_path",
        ),
        (
            [
                {
                    "table": "RawDataPackage",
                    "column": "metadata",
                    "operator": "gt",
                    "value": "400",
                    "json_path": "observation.frequency_ghz",
                }
            ],
            "gt on a json_path compares numbers",
        ),
        (
            [
                {
                    "table": "RawDataPackage",
                    "column": "metadata",
                    "operator": "eq",
                    "value": 1,
                    "json_path": "a..b",
                }
            ],
            "json_path 'a..b'",
        ),
        (
            [
                {
                    "table": "Source",
                    "column": "name",
                    "operator": "eq",
                    "value": "a",
                    "json_path": "x",
                }
            ],
            "Source.name is not a JSON column",
        ),
        (
            [{"table": "RawDataPackage", "column": "archived_at", "operator": "gt", "value": "x"}],
            "is not an ISO date-time",
        ),
        (
            [
                {
                    "table": "RawDataPackage",
                    "column": "executed_obs_unit_id",
                    "operator": "eq",
                    "value": "nope",
                }
            ],
            "'nope' is not a UUID",
        ),
        (
            [{"table": "Instrument", "column": "available", "operator": "eq", "value": "yes"}],
            "holds true or false",
        ),
        (
            [{"table": "Source", "column": "name", "operator": "eq", "value": None}],
            "null is not a value",
        ),
        (
            [{"table": "RawDataPackage", "column": "size", "operator": "gt", "value": 2**64}],
            "outside the 64-bit range",
        ),
        (
            [
                {
                    "table": "RawDataPackage",
                    "column": "metadata",
                    "operator": "lt",
                    "value": -(2**70),
                    "json_path": "x",
                }
            ],
            "outside the 64-bit range",
        ),
        (
            [{"table": "Source", "column": "name", "operator": "eq", "value": "a\x00b"}],
            "contains a NUL character",
        ),
    ],
)
def test_a_grouping_with_an_invalid_rule_is_refused_naming_the_rule(
    rules: Any, message: str
) -> None:
    grouping = DataGrouping(name="bad", filter_rules=rules)

    with pytest.raises(ValidationError) as raised:
        grouping.full_clean()

    assert list(raised.value.message_dict) == ["filter_rules"]
    assert message in messages_of(raised.value)
    assert not DataGrouping.objects.exists()


def test_every_bad_rule_is_reported_and_valid_rules_are_stored_normalised() -> None:
    bad = DataGrouping(
        name="two-bad",
        filter_rules=[
            {"table": "source", "column": "nme", "operator": "eq", "value": "a"},
            {"table": "Source", "column": "name", "operator": "eq", "value": "a"},
            {"table": "Line", "column": "name", "operator": "is", "value": "a"},
        ],
    )
    with pytest.raises(ValidationError) as raised:
        bad.full_clean()
    text = messages_of(raised.value)
    assert "rule 1 (source.nme eq 'a'): unknown column 'nme'" in text
    assert "rule 3 (Line.name is 'a'): unknown operator 'is'" in text
    assert "rule 2" not in text

    good = DataGrouping(
        name="good",
        filter_rules=[{"table": "obs_unit", "column": "name", "operator": "eq", "value": "x"}],
    )
    good.full_clean()
    assert good.filter_rules == [
        {"table": "ObsUnit", "column": "name", "operator": "eq", "value": "x"}
    ]


# --- the admin -----------------------------------------------------------------------------------
@pytest.fixture
def operator_client() -> Client:
    user = UserFactory(username="olga", is_staff=True)
    user.groups.add(ensure_groups()[OPERATORS])
    client = Client()
    client.force_login(user)
    return client


def add_form_data(client: Client, url: str, **values: Any) -> dict[str, Any]:
    """What the add page posts with its initial values, no inline rows, and ``values``."""
    response = client.get(url)
    assert response.status_code == 200
    form = response.context["adminform"].form
    data: dict[str, Any] = {}
    for name in form.fields:
        value = form[name].value()
        if value is not None:
            data[name] = value
    for inline in response.context["inline_admin_formsets"]:
        prefix = inline.formset.prefix
        data |= {f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0"}
    for name, value in values.items():
        data[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return data


def admin_url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:pipelines_{model._meta.model_name}_{view}", args=args)


def form_errors(response: Any) -> str:
    assert response.status_code == 200, "the form was accepted"
    return json.dumps(response.context["adminform"].form.errors)


def test_the_admin_add_form_refuses_invalid_rules_and_saves_nothing(
    operator_client: Client,
) -> None:
    url = admin_url(DataGrouping, "add")
    rules = [{"table": "Source", "column": "nme", "operator": "eq", "value": "NGC253"}]

    response = operator_client.post(
        url, add_form_data(operator_client, url, name="bad", filter_rules=rules)
    )

    assert "rule 1 (Source.nme eq 'NGC253'): unknown column 'nme'" in form_errors(response)
    assert "Tables: RawDataPackage, ExecutedObsUnit" in response.content.decode()  # the help
    assert not DataGrouping.objects.exists()

    rules[0]["column"] = "name"
    response = operator_client.post(
        url, add_form_data(operator_client, url, name="good", filter_rules=rules)
    )
    assert response.status_code == 302
    assert DataGrouping.objects.get(name="good").filter_rules == rules


def test_the_admin_change_page_previews_what_the_grouping_selects(
    operator_client: Client,
) -> None:
    grouping = DataGroupingFactory(filter_rules=[])
    ReductionStepFactory(pipeline=PipelineFactory(data_grouping=grouping), group_by=["source"])

    page = operator_client.get(admin_url(DataGrouping, "change", grouping.pk)).content.decode()

    assert "0 matching package(s)" in page
    assert "by source: 0 sub-group(s)" in page


def test_the_admin_add_form_refuses_an_invalid_cron_and_saves_nothing(
    operator_client: Client,
) -> None:
    url = admin_url(Pipeline, "add")
    values = {
        "name": "nightly",
        "data_grouping": DataGroupingFactory().pk,
        "processing_location": DataLocationFactory(location_type="processing").pk,
        "trigger_type": "cron",
        "trigger_config": {"cron": "0 25 * * *"},
    }

    response = operator_client.post(url, add_form_data(operator_client, url, **values))

    assert "&#x27;0 25 * * *&#x27; is not a cron expression" in response.content.decode()
    assert not Pipeline.objects.exists()
    values["trigger_config"] = {"cron": "0 3 * * *"}
    response = operator_client.post(url, add_form_data(operator_client, url, **values))
    assert response.status_code == 302
    assert Pipeline.objects.get().trigger_config == {"cron": "0 3 * * *"}


def test_the_admin_add_form_refuses_bad_resources_and_group_by_and_saves_nothing(
    operator_client: Client,
) -> None:
    url = admin_url(ReductionStep, "add")
    values = {
        "pipeline": PipelineFactory().pk,
        "name": "calibrate",
        "software": ReductionSoftwareFactory().pk,
        "resource_requirements": {"cpu": 4, "memory_gb": 16, "time_hours": 1000},
        "group_by": ["scan"],
    }

    response = operator_client.post(url, add_form_data(operator_client, url, **values))

    errors = form_errors(response)
    assert "time_hours must be a number of hours" in errors
    assert "unknown group_by key 'scan'" in errors
    assert not ReductionStep.objects.exists()


def test_the_admin_change_form_refuses_a_cycle_and_saves_links_through_the_service(
    operator_client: Client,
) -> None:
    first, second = chain(2)
    third = ReductionStepFactory(pipeline=first.pipeline, name="s2")
    url = admin_url(ReductionStep, "change", first.pk)
    page = operator_client.get(url)
    form = page.context["adminform"].form
    # Only the other steps of the pipeline are offered as upstream steps.
    assert set(form.fields["depends_on"].queryset) == {second, third}
    data = add_form_data(operator_client, url)

    response = operator_client.post(url, data | {"depends_on": [str(second.pk)]})

    assert "these dependencies would make a cycle: s0 -&gt; s1 -&gt; s0" in (
        response.content.decode()
    )
    assert not first.depends_on.exists()
    response = operator_client.post(url, data | {"depends_on": [str(third.pk)]})
    assert response.status_code == 302
    assert list(first.depends_on.all()) == [third]


def test_the_admin_add_form_refuses_an_upstream_step_of_another_pipeline(
    operator_client: Client,
) -> None:
    (theirs,) = chain(1)
    url = admin_url(ReductionStep, "add")
    values = {
        "pipeline": PipelineFactory().pk,
        "name": "combine",
        "software": ReductionSoftwareFactory().pk,
    }
    data = add_form_data(operator_client, url, **values) | {"depends_on": [str(theirs.pk)]}

    response = operator_client.post(url, data)

    assert "of another pipeline" in form_errors(response)
    assert not ReductionStep.objects.filter(name="combine").exists()
    (ours,) = chain(1)
    data |= {"pipeline": ours.pipeline_id, "depends_on": [str(ours.pk)]}
    assert operator_client.post(url, data).status_code == 302
    assert list(ReductionStep.objects.get(name="combine").depends_on.all()) == [ours]


# --- concurrency ---------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_two_edits_closing_a_cycle_together_are_serialised_and_the_second_refused(
    require_postgres: None,
) -> None:
    """Each edit alone is fine (a -> b, b -> a); together they make a cycle. The pipeline-row
    lock makes the second wait for the first to commit, then see its link and refuse."""
    a, b = (ReductionStepFactory(pipeline=PipelineFactory(), name=n) for n in ("a", "b"))
    b.pipeline = a.pipeline
    b.save()
    first_holds_lock, release_first = threading.Event(), threading.Event()
    outcome: dict[str, BaseException | None] = {}

    def first() -> None:
        try:
            with transaction.atomic():
                reduction_step_set_dependencies(a, [b])
                first_holds_lock.set()
                release_first.wait(10)
        finally:
            connection.close()

    def second() -> None:
        first_holds_lock.wait(10)
        try:
            reduction_step_set_dependencies(b, [a])
            outcome["second"] = None
        except ValidationError as exc:
            outcome["second"] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    first_holds_lock.wait(10)
    time.sleep(0.5)
    assert "second" not in outcome  # waiting for the lock, not deciding on stale links
    release_first.set()
    for thread in threads:
        thread.join(30)

    assert isinstance(outcome["second"], ValidationError)
    assert "cycle: b -> a -> b" in messages_of(outcome["second"])
    assert list(a.depends_on.all()) == [b]
    assert not b.depends_on.exists()
