"""Sub-groups (pipelines/grouping.py): group_by, sub_group_key, package_sub_groups and preview.

Behaviours 4, 5 and 6 of the workflow-manager brief (§8), from the grouping side: the trigger
manager creates one run per sub-group these functions return (tests/pipelines/test_triggers*.py).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from pipelines.grouping import (
    GROUP_BY_DIMENSIONS,
    SUB_GROUP_KEY_MAX,
    SubGroup,
    grouping_queryset,
    package_sub_groups,
    preview,
    sub_group_key,
    validate_group_by,
)
from tests.factories import DataGroupingFactory, PipelineFactory, ReductionStepFactory
from tests.pipelines.test_grouping import World, example_rules, rule

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> World:
    return World()


def test_behaviour_4_packages_of_three_scans_give_three_sub_groups_per_scan(world: World) -> None:
    scans = [world.scan() for _ in range(3)]
    packages = {scan.pk: [world.package(scan=scan) for _ in range(2)] for scan in scans}
    grouping = DataGroupingFactory(filter_rules=example_rules())

    groups = package_sub_groups(grouping_queryset(grouping), ["executed_obs_unit"])

    assert len(groups) == 3
    assert len({group.key for group in groups.values()}) == 3
    for scan in scans:
        key = f"executed_obs_unit={scan.pk}"
        assert groups[key] == SubGroup(
            key=key,
            values={"executed_obs_unit": str(scan.pk)},
            package_ids=sorted(p.pk for p in packages[scan.pk]),
        )


def test_behaviour_5_an_empty_group_by_puts_all_matching_packages_in_one_sub_group(
    world: World,
) -> None:
    matching = [world.package() for _ in range(3)] + [world.package(module="HFA")]
    world.package(source="M82")
    grouping = DataGroupingFactory(filter_rules=example_rules())

    groups = package_sub_groups(grouping_queryset(grouping), [])

    assert list(groups) == ["all"]
    assert groups["all"].values == {}
    assert groups["all"].package_ids == sorted(p.pk for p in matching)
    assert preview(grouping, []) == [{"key": "all", "values": {}, "count": 4}]


def test_behaviour_5_nothing_matching_gives_no_sub_group_at_all(world: World) -> None:
    world.package(source="M82")
    grouping = DataGroupingFactory(filter_rules=example_rules())

    assert package_sub_groups(grouping_queryset(grouping), []) == {}
    assert preview(grouping, []) == []
    assert preview(grouping, ["source"]) == []


def test_behaviour_6_steps_sharing_a_grouping_partition_it_by_their_own_group_by(
    world: World,
) -> None:
    scans = {name: world.scan(source=name) for name in ("NGC253", "M82")}
    for scan in scans.values():
        world.package(scan=scan, module="LFA")
        world.package(scan=scan, module="HFA")
    world.package(source="M82")  # a second M82 scan
    grouping = DataGroupingFactory(filter_rules=[rule("Instrument", "name", "eq", "CHAI")])
    per_scan = ReductionStepFactory(
        pipeline=PipelineFactory(data_grouping=grouping), group_by=["executed_obs_unit"]
    )
    per_source = ReductionStepFactory(
        pipeline=PipelineFactory(data_grouping=grouping), group_by=["source", "instrument_module"]
    )
    packages = grouping_queryset(grouping)

    by_scan = package_sub_groups(packages, per_scan.group_by)
    by_source = package_sub_groups(packages, per_source.group_by)

    every_package = sorted(packages.values_list("pk", flat=True))
    for partition in (by_scan, by_source):
        assert sorted(pk for group in partition.values() for pk in group.package_ids) == (
            every_package
        )
    assert len(by_scan) == 3
    assert sorted(by_source) == [
        "source=M82;instrument_module=CHAI/HFA",
        "source=M82;instrument_module=CHAI/LFA",
        "source=NGC253;instrument_module=CHAI/HFA",
        "source=NGC253;instrument_module=CHAI/LFA",
    ]
    assert by_source["source=M82;instrument_module=CHAI/LFA"].values == {
        "source": "M82",
        "instrument_module": "CHAI/LFA",
    }
    assert len(by_source["source=M82;instrument_module=CHAI/LFA"].package_ids) == 2


def test_every_dimension_groups_and_missing_values_read_as_a_tilde(world: World) -> None:
    world.package(source="NGC253", line="CO43")
    world.package(source=None, line=None)
    packages = grouping_queryset(DataGroupingFactory(filter_rules=[]))

    for dim in GROUP_BY_DIMENSIONS:
        groups = package_sub_groups(packages, [dim])
        assert sum(len(g.package_ids) for g in groups.values()) == 2, dim
    assert sorted(package_sub_groups(packages, ["source", "line"])) == [
        "source=NGC253;line=CO43",
        "source=~;line=~",
    ]


def test_metadata_paths_group_and_render_json_values_canonically(world: World) -> None:
    world.package(name="a", metadata={"obs": {"band": "B7", "tuning": {"lo": 1}}})
    world.package(name="b", metadata={"obs": {"band": "B7", "tuning": {"lo": 1}}})
    world.package(name="c", metadata={"obs": {"band": 8}})
    world.package(name="d", metadata={"obs": {"band": True}})
    world.package(name="e", metadata={})
    grouping = DataGroupingFactory(filter_rules=[])

    groups = package_sub_groups(grouping_queryset(grouping), ["metadata.obs.band"])

    assert sorted(groups) == [
        "metadata.obs.band=8",
        "metadata.obs.band=B7",
        "metadata.obs.band=true",
        "metadata.obs.band=~",
    ]
    assert groups["metadata.obs.band=B7"].values == {"metadata.obs.band": "B7"}
    tuning = package_sub_groups(grouping_queryset(grouping), ["metadata.obs.tuning"])
    assert len(tuning['metadata.obs.tuning={"lo":1}'].package_ids) == 2
    counts = {entry["key"]: entry["count"] for entry in preview(grouping, ["metadata.obs.band"])}
    assert counts == {
        "metadata.obs.band=8": 1,
        "metadata.obs.band=B7": 2,
        "metadata.obs.band=true": 1,
        "metadata.obs.band=~": 1,
    }


def test_sub_group_keys_are_stable_readable_and_unambiguous() -> None:
    assert sub_group_key([], {}) == "all"
    assert sub_group_key(["source", "line"], {"source": "NGC253", "line": "CO43"}) == (
        "source=NGC253;line=CO43"
    )
    # The order is group_by's, not the dict's.
    assert sub_group_key(["line", "source"], {"source": "NGC253", "line": "CO43"}) == (
        "line=CO43;source=NGC253"
    )
    # A value holding the separators cannot pose as two dimensions.
    tricky = sub_group_key(["source", "line"], {"source": "A;line=B", "line": "C"})
    plain = sub_group_key(["source", "line"], {"source": "A", "line": "B;line=C"})
    assert tricky != plain and tricky == "source=A%3Bline%3DB;line=C"
    assert sub_group_key(["source"], {"source": None}) != sub_group_key(["source"], {"source": ""})
    assert sub_group_key(["source"], {"source": "~"}) == "source=%7E"
    scan = uuid.uuid4()
    assert sub_group_key(["executed_obs_unit"], {"executed_obs_unit": scan}) == (
        sub_group_key(["executed_obs_unit"], {"executed_obs_unit": str(scan)})
    )
    assert sub_group_key(["metadata.n"], {"metadata.n": 12}) == "metadata.n=12"


def test_a_long_sub_group_key_is_cut_to_200_characters_with_a_hash() -> None:
    values = {"metadata.a": "x" * 300}
    other = {"metadata.a": "x" * 299 + "y"}

    key = sub_group_key(["metadata.a"], values)

    assert len(key) == SUB_GROUP_KEY_MAX
    assert key == sub_group_key(["metadata.a"], values)  # stable
    assert key != sub_group_key(["metadata.a"], other)  # same prefix, other hash
    assert key.startswith("metadata.a=xxx") and "#" in key[-17:]


@pytest.mark.parametrize(
    ("group_by", "message"),
    [
        ("executed_obs_unit", "group_by is a list of keys"),
        (["scan"], "unknown group_by key 'scan'; known: executed_obs_unit, obs_unit"),
        (["source", "source"], "group_by key 'source' appears twice"),
        ([7], "group_by key 7 is not text"),
        (["metadata."], "the metadata path must be"),
        (["metadata.a..b"], "the metadata path must be"),
        ([f"metadata.k{i}" for i in range(9)], "at most 8 keys"),
    ],
)
def test_an_invalid_group_by_is_refused_naming_the_bad_key(group_by: Any, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        validate_group_by(group_by)
    assert message in " ".join(raised.value.messages)

    with pytest.raises(ValidationError):
        package_sub_groups(grouping_queryset(DataGroupingFactory(filter_rules=[])), group_by)


def test_preview_counts_each_sub_group_like_package_sub_groups(world: World) -> None:
    for source, count in (("NGC253", 3), ("M82", 2)):
        scan = world.scan(source=source)
        for _ in range(count):
            world.package(scan=scan)
    world.package(source="M82", state="waiting")
    grouping = DataGroupingFactory(filter_rules=[rule("RawDataPackage", "state", "eq", "archived")])

    result = preview(grouping, ["source"])

    assert result == [
        {"key": "source=M82", "values": {"source": "M82"}, "count": 2},
        {"key": "source=NGC253", "values": {"source": "NGC253"}, "count": 3},
    ]
    groups = package_sub_groups(grouping_queryset(grouping), ["source"])
    assert {key: len(g.package_ids) for key, g in groups.items()} == {
        entry["key"]: entry["count"] for entry in result
    }


@pytest.mark.parametrize("rows", [2, 40])
def test_grouping_sub_groups_and_preview_are_one_query_each_whatever_the_row_count(
    world: World, django_assert_num_queries: Any, rows: int
) -> None:
    for i in range(rows):
        scan = world.scan(source="NGC253" if i % 2 else "M82")
        world.package(scan=scan, metadata={"observation": {"frequency_ghz": 460 + i}})
    grouping = DataGroupingFactory(
        filter_rules=[
            rule("Instrument", "name", "eq", "CHAI"),
            rule("RawDataPackage", "metadata", "gt", 400, json_path="observation.frequency_ghz"),
            rule("Source", "name", "like", "%"),
        ]
    )
    group_by = ["source", "instrument_module", "executed_obs_unit", "metadata.observation.band"]

    with django_assert_num_queries(1):
        assert len(list(grouping_queryset(grouping))) == rows
    with django_assert_num_queries(1):
        groups = package_sub_groups(grouping_queryset(grouping), group_by)
    with django_assert_num_queries(1):
        counts = preview(grouping, group_by)

    assert len(groups) == rows
    assert sum(entry["count"] for entry in counts) == rows
