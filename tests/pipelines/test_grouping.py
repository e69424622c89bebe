"""The filter engine (pipelines/grouping.py): rules -> one query over RawDataPackage.

Behaviours 17-23 of the workflow-manager brief (§8). Every test runs on the database of the run:
SQLite by default, PostgreSQL with DATABASE_URL=postgres://...; the engine must answer the same on
both (``like`` is case-sensitive on both).
"""

from __future__ import annotations

from typing import Any

import pytest

from pipelines.grouping import (
    CaseSensitiveLike,
    FilterRuleError,
    grouping_queryset,
    like_to_glob,
    rules_queryset,
    validate_filter_rules,
)
from pipelines.models import (
    ExecutedObsUnit,
    Instrument,
    InstrumentModule,
    Line,
    ObsUnit,
    RawDataPackage,
    Source,
)
from tests.factories import (
    DataGroupingFactory,
    ExecutedObsUnitFactory,
    InstrumentFactory,
    InstrumentModuleFactory,
    LineFactory,
    ObsUnitFactory,
    RawDataPackageFactory,
    SourceFactory,
    TelescopeFactory,
)

pytestmark = pytest.mark.django_db


class World:
    """Builds packages by the names of their source, line, instrument and module, reusing rows
    of the same name, so a test reads as the data it needs."""

    def __init__(self) -> None:
        self.telescope = TelescopeFactory()
        self.sources: dict[str, Source] = {}
        self.lines: dict[str, Line] = {}
        self.instruments: dict[str, Instrument] = {}
        self.modules: dict[tuple[str, str], InstrumentModule] = {}
        self.obs_units: dict[tuple[str | None, str | None], ObsUnit] = {}

    def module(self, instrument: str, module: str) -> InstrumentModule:
        if instrument not in self.instruments:
            self.instruments[instrument] = InstrumentFactory(
                telescope=self.telescope, name=instrument
            )
        if (instrument, module) not in self.modules:
            self.modules[instrument, module] = InstrumentModuleFactory(
                instrument=self.instruments[instrument], name=module
            )
        return self.modules[instrument, module]

    def obs_unit(self, source: str | None, line: str | None) -> ObsUnit:
        if (source, line) not in self.obs_units:
            if source and source not in self.sources:
                self.sources[source] = SourceFactory(name=source)
            if line and line not in self.lines:
                self.lines[line] = LineFactory(name=line)
            self.obs_units[source, line] = ObsUnitFactory(
                source=self.sources.get(source) if source else None,
                line=self.lines.get(line) if line else None,
            )
        return self.obs_units[source, line]

    def scan(self, source: str | None = "NGC253", line: str | None = "CO43") -> ExecutedObsUnit:
        return ExecutedObsUnitFactory(obs_unit=self.obs_unit(source, line))

    def package(
        self,
        *,
        source: str | None = "NGC253",
        line: str | None = "CO43",
        instrument: str = "CHAI",
        module: str = "LFA",
        state: str = "archived",
        scan: ExecutedObsUnit | None = None,
        **fields: Any,
    ) -> RawDataPackage:
        return RawDataPackageFactory(
            executed_obs_unit=scan or self.scan(source, line),
            instrument_module=self.module(instrument, module),
            state=state,
            **fields,
        )


@pytest.fixture
def world() -> World:
    return World()


def rule(table: str, column: str, operator: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"table": table, "column": column, "operator": operator, "value": value, **extra}


def names(rules: list[dict[str, Any]], **kwargs: Any) -> set[str]:
    return set(rules_queryset(rules, **kwargs).values_list("name", flat=True))


def test_behaviour_17_rules_are_anded_a_package_failing_one_rule_is_excluded(world: World) -> None:
    all_match = world.package(name="all", size=5000)
    wrong_size = world.package(name="small", size=10)
    wrong_source = world.package(name="m82", source="M82", size=5000)
    rules = [
        rule("Source", "name", "eq", "NGC253"),
        rule("RawDataPackage", "size", "gt", 1000),
        rule("RawDataPackage", "state", "eq", "archived"),
    ]

    assert names(rules) == {all_match.name}
    assert wrong_size.name not in names(rules) and wrong_source.name not in names(rules)
    # Each rule alone lets the package failing the other one through: the AND is what excludes.
    assert wrong_size.name in names([rules[0]])
    assert wrong_source.name in names([rules[1]])


# (operator, value, the sizes that match) over packages of size 10, 20 and 30.
SIZE_CASES = [
    ("eq", 20, {20}),
    ("neq", 20, {10, 30}),
    ("in", [10, 30], {10, 30}),
    ("not_in", [10, 30], {20}),
    ("gt", 20, {30}),
    ("gte", 20, {20, 30}),
    ("lt", 20, {10}),
    ("lte", 20, {10, 20}),
]


@pytest.mark.parametrize(("operator", "value", "matching"), SIZE_CASES)
def test_behaviour_18_each_comparison_operator_matches_like_sql(
    world: World, operator: str, value: Any, matching: set[int]
) -> None:
    for size in (10, 20, 30):
        world.package(name=f"size-{size}", size=size)

    found = {p.size for p in rules_queryset([rule("RawDataPackage", "size", operator, value)])}

    assert found == matching  # positive: these match ...
    assert {10, 20, 30} - found == {10, 20, 30} - matching  # ... negative: the rest do not


@pytest.mark.parametrize(
    ("pattern", "matching"),
    [
        ("NGC%", {"NGC253", "NGC1068", "NGC_x"}),
        ("ngc%", {"ngc253"}),  # case-sensitive on every database
        ("NGC25_", {"NGC253"}),
        ("%1068", {"NGC1068"}),
        ("NGC\\_x", {"NGC_x"}),  # an escaped wildcard is literal
        ("NGC\\_%", {"NGC_x"}),
        ("M*%", {"M*star"}),  # GLOB's wildcards are plain text in a LIKE pattern
        ("M*", set()),
        ("M?star", set()),
        ("M[*]%", set()),
        ("%", {"NGC253", "NGC1068", "NGC_x", "ngc253", "M*star", "M82"}),
        ("M82", {"M82"}),
        ("M8", set()),
    ],
)
def test_behaviour_18_like_matches_like_sql_like_and_is_case_sensitive(
    world: World, pattern: str, matching: set[str]
) -> None:
    for source in ("NGC253", "NGC1068", "NGC_x", "ngc253", "M*star", "M82"):
        world.package(source=source)

    found = set(
        rules_queryset([rule("Source", "name", "like", pattern)]).values_list(
            "executed_obs_unit__obs_unit__source__name", flat=True
        )
    )

    assert found == matching


def test_behaviour_18_like_on_a_json_path_is_case_sensitive_and_only_matches_text(
    world: World,
) -> None:
    world.package(name="upper", metadata={"observation": {"band": "Band7"}})
    world.package(name="lower", metadata={"observation": {"band": "band7"}})
    world.package(name="number", metadata={"observation": {"band": 7}})
    like = rule("RawDataPackage", "metadata", "like", "Band%", json_path="observation.band")
    any_text = rule("RawDataPackage", "metadata", "like", "%", json_path="observation.band")

    assert names([like]) == {"upper"}
    assert names([any_text]) == {"upper", "lower"}


def test_like_patterns_translate_to_glob_with_literal_glob_characters() -> None:
    assert like_to_glob("NGC%") == "NGC*"
    assert like_to_glob("a_b") == "a?b"
    assert like_to_glob("100\\%") == "100%"
    assert like_to_glob("x*y?[z]") == "x[*]y[?][[]z]"
    with pytest.raises(ValueError, match="escape"):
        like_to_glob("trailing\\")


def test_like_is_an_expression_not_a_registered_lookup() -> None:
    # Registering it would give every CharField a surprise ``__like`` lookup.
    from django.db import models

    assert "like" not in models.CharField.get_lookups()
    assert CaseSensitiveLike.lookup_name == "like"


def test_neq_and_not_in_leave_out_packages_without_a_value_as_sql_does(world: World) -> None:
    world.package(name="co43", line="CO43")
    world.package(name="ci10", line="CI10")
    world.package(name="no-line", line=None)

    assert names([rule("Line", "name", "neq", "CO43")]) == {"ci10"}
    assert names([rule("Line", "name", "not_in", ["CO43"])]) == {"ci10"}
    assert names([rule("Line", "name", "eq", "CO43")]) == {"co43"}


def test_datetime_and_boolean_columns_compare_typed_values(world: World) -> None:
    from datetime import UTC, datetime

    world.package(name="old", archived_at=datetime(2026, 1, 1, tzinfo=UTC))
    world.package(name="new", archived_at=datetime(2026, 6, 1, tzinfo=UTC))
    world.package(name="never", archived_at=None)

    assert names([rule("RawDataPackage", "archived_at", "gte", "2026-03-01T00:00:00Z")]) == {"new"}
    assert names([rule("RawDataPackage", "archived_at", "lt", "2026-03-01")]) == {"old"}
    assert names([rule("Instrument", "available", "eq", True)]) == {"old", "new", "never"}
    assert names([rule("Instrument", "available", "neq", True)]) == set()


def test_behaviour_19_a_source_name_rule_returns_exactly_that_sources_packages(
    world: World,
) -> None:
    ngc = {world.package(name=f"ngc-{i}").name for i in range(3)}
    world.package(name="m82", source="M82")
    world.package(name="no-source", source=None)

    queryset = rules_queryset([rule("Source", "name", "eq", "NGC253")])

    assert set(queryset.values_list("name", flat=True)) == ngc
    # The joins were added by the engine: package -> scan -> obs unit -> source.
    sql = str(queryset.query).lower()
    assert "executed_obs_unit" in sql and "obs_unit" in sql and '"source"' in sql


def test_behaviour_20_a_json_path_rule_compares_numbers_inside_metadata(world: World) -> None:
    world.package(name="460", metadata={"observation": {"frequency_ghz": 460}})
    world.package(name="345", metadata={"observation": {"frequency_ghz": 345}})
    world.package(name="missing", metadata={"observation": {}})
    world.package(name="empty", metadata={})
    world.package(name="text", metadata={"observation": {"frequency_ghz": "460"}})
    world.package(name="null", metadata={"observation": {"frequency_ghz": None}})
    above = rule("RawDataPackage", "metadata", "gt", 400, json_path="observation.frequency_ghz")

    assert names([above]) == {"460"}
    # Only numbers are compared, whichever operator: missing keys, null and text never match.
    below = above | {"operator": "lte"}
    assert names([below]) == {"345"}
    assert names([above | {"operator": "neq", "value": 460}]) == {"345"}
    assert names([above | {"operator": "eq", "value": 460.0}]) == {"460"}
    assert names([above | {"operator": "in", "value": [345, 1]}]) == {"345"}
    assert names([above | {"operator": "not_in", "value": [345]}]) == {"460"}
    assert names([above | {"operator": "eq", "value": "460"}]) == {"text"}


def test_behaviour_20_json_text_values_compare_as_text(world: World) -> None:
    world.package(name="b7", metadata={"obs": {"band": "B7"}})
    world.package(name="b8", metadata={"obs": {"band": "B8"}})
    world.package(name="seven", metadata={"obs": {"band": 7}})
    band = rule("RawDataPackage", "metadata", "in", ["B7", "B9"], json_path="obs.band")

    assert names([band]) == {"b7"}
    assert names([band | {"operator": "not_in"}]) == {"b8"}
    assert names([band | {"operator": "eq", "value": "B8"}]) == {"b8"}
    assert names([band | {"operator": "neq", "value": "B8"}]) == {"b7"}


def test_behaviour_20_json_booleans_and_nested_paths(world: World) -> None:
    world.package(name="yes", metadata={"qa": {"ok": True}})
    world.package(name="no", metadata={"qa": {"ok": False}})
    world.package(name="one", metadata={"qa": {"ok": 1}})
    ok = rule("RawDataPackage", "metadata", "eq", True, json_path="qa.ok")

    assert names([ok]) == {"yes"}
    assert names([ok | {"operator": "neq"}]) == {"no"}


def test_json_path_rules_reach_scan_conditions(world: World) -> None:
    dry = world.scan()
    dry.conditions = {"pwv_mm": 0.4}
    dry.save()
    wet = world.scan()
    wet.conditions = {"pwv_mm": 2.1}
    wet.save()
    world.package(name="dry", scan=dry)
    world.package(name="wet", scan=wet)

    assert names([rule("ExecutedObsUnit", "conditions", "lt", 1, json_path="pwv_mm")]) == {"dry"}


def example_rules() -> list[dict[str, Any]]:
    # The brief's example (§3.2), with the line and instrument matched by name.
    return [
        rule("Source", "name", "eq", "NGC253"),
        rule("Line", "name", "eq", "CO43"),
        rule("Instrument", "name", "eq", "CHAI"),
        rule("RawDataPackage", "state", "eq", "archived"),
    ]


def test_behaviour_21_the_example_grouping_excludes_every_other_package(world: World) -> None:
    wanted = world.package(name="wanted")
    wanted_hfa = world.package(name="wanted-hfa", module="HFA")
    world.package(name="waiting", state="waiting")
    world.package(name="transferring", state="transferring")
    world.package(name="other-instrument", instrument="Prime-Cam", module="EoR")
    world.package(name="other-line", line="CI10")
    world.package(name="other-source", source="M82")
    grouping = DataGroupingFactory(filter_rules=example_rules())

    assert set(grouping_queryset(grouping).values_list("name", flat=True)) == {
        wanted.name,
        wanted_hfa.name,
    }
    # The same, with the module named (the brief's InstrumentModule rule) and with the line by
    # its id on ObsUnit (the brief's ObsUnit.line_id).
    by_module = [*example_rules()[:2], rule("InstrumentModule", "name", "eq", "LFA")]
    assert names([*by_module, example_rules()[3]]) == {wanted.name}
    line_id = world.lines["CO43"].pk
    by_line_id = [example_rules()[0], rule("ObsUnit", "line_id", "eq", line_id)]
    assert names([*by_line_id, *example_rules()[2:]]) == {wanted.name, wanted_hfa.name}


def test_behaviour_22_a_groupings_instrument_module_scopes_it_without_any_rule(
    world: World,
) -> None:
    lfa = world.package(name="lfa", module="LFA")
    world.package(name="hfa", module="HFA")
    world.package(name="primecam", instrument="Prime-Cam", module="EoR")
    grouping = DataGroupingFactory(
        filter_rules=[rule("Source", "name", "eq", "NGC253")],
        instrument_module=world.modules["CHAI", "LFA"],
    )
    no_rules = DataGroupingFactory(filter_rules=[], instrument_module=world.modules["CHAI", "LFA"])

    assert list(grouping_queryset(grouping)) == [lfa]
    assert list(grouping_queryset(no_rules)) == [lfa]


@pytest.mark.parametrize(
    ("bad_rule", "message"),
    [
        (rule("Sauce", "name", "eq", "x"), "unknown table 'Sauce'; known: RawDataPackage"),
        (rule("Source", "nme", "eq", "x"), "unknown column 'nme'"),
        (rule("Source", "name", "equals", "x"), "unknown operator 'equals'; known: eq, neq"),
    ],
)
def test_behaviour_23_unknown_table_column_or_operator_is_refused_when_created(
    bad_rule: dict[str, Any], message: str
) -> None:
    from pipelines.models import DataGrouping

    grouping = DataGrouping(name="bad", filter_rules=[rule("Source", "name", "eq", "a"), bad_rule])

    with pytest.raises(FilterRuleError) as raised:
        validate_filter_rules(grouping.filter_rules)
    assert "rule 2 (" in str(raised.value) and message in str(raised.value)
    with pytest.raises(Exception) as cleaned:
        grouping.full_clean()
    assert message in str(cleaned.value)
    assert not DataGrouping.objects.filter(name="bad").exists()


def test_resolving_a_grouping_whose_stored_rules_are_invalid_is_refused(world: World) -> None:
    grouping = DataGroupingFactory(filter_rules=[rule("Source", "colour", "eq", "red")])

    with pytest.raises(FilterRuleError, match=r"rule 1 .*unknown column 'colour'"):
        grouping_queryset(grouping)


def test_a_grouping_resolves_in_one_query_whatever_the_rules(
    world: World, django_assert_num_queries: Any
) -> None:
    for i in range(5):
        world.package(name=f"p{i}", metadata={"observation": {"frequency_ghz": 460}})
    rules = [
        *example_rules(),
        rule("RawDataPackage", "metadata", "gt", 400, json_path="observation.frequency_ghz"),
        rule("Source", "name", "like", "NGC%"),
        rule("Line", "name", "not_in", ["CI10"]),
    ]

    with django_assert_num_queries(1):
        assert len(list(rules_queryset(rules))) == 5


def test_a_built_query_is_reused_but_every_caller_gets_its_own_clone(world: World) -> None:
    from pipelines import grouping

    world.package(name="big", size=5000)
    world.package(name="small", size=10)
    rules = [rule("RawDataPackage", "size", "gte", 10)]
    grouping._cached_queryset.cache_clear()

    first = rules_queryset(rules)
    narrowed = first.filter(size__gt=100)  # a caller narrowing its copy ...
    second = rules_queryset(rules)

    assert grouping._cached_queryset.cache_info().hits == 1
    assert first is not second
    assert {p.name for p in narrowed} == {"big"}
    assert {p.name for p in second} == {"big", "small"}  # ... leaves the next caller's alone
    # A changed rule is another key: never a stale answer.
    assert names([rule("RawDataPackage", "size", "gte", 100)]) == {"big"}
