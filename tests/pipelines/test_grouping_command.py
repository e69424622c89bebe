"""``manage.py grouping_preview``: counts per sub-group; bad input is a CommandError."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from pipelines.models import DataGrouping
from tests.factories import DataGroupingFactory
from tests.pipelines.test_grouping import World, rule

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("grouping_preview", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def chai() -> DataGrouping:
    world = World()
    for source, scans in (("NGC253", 2), ("M82", 1)):
        for _ in range(scans):
            scan = world.scan(source=source)
            world.package(scan=scan, module="LFA")
            world.package(scan=scan, module="HFA")
    world.package(source="M82", state="waiting")
    return DataGroupingFactory(
        name="chai-archived",
        filter_rules=[
            rule("Instrument", "name", "eq", "CHAI"),
            rule("RawDataPackage", "state", "eq", "archived"),
        ],
    )


def test_it_prints_the_count_of_each_sub_group_and_a_total(chai: DataGrouping) -> None:
    lines = run("chai-archived", "--group-by", "source", "instrument_module").splitlines()

    assert [line.split() for line in lines[:-1]] == [
        ["source=M82;instrument_module=CHAI/HFA", "1"],
        ["source=M82;instrument_module=CHAI/LFA", "1"],
        ["source=NGC253;instrument_module=CHAI/HFA", "2"],
        ["source=NGC253;instrument_module=CHAI/LFA", "2"],
    ]
    assert lines[-1] == "chai-archived: 6 packages in 4 sub-groups"


def test_group_by_may_be_repeated(chai: DataGrouping) -> None:
    assert run("chai-archived", "--group-by", "source", "--group-by", "instrument_module") == (
        run("chai-archived", "--group-by", "source", "instrument_module")
    )


def test_without_group_by_everything_is_one_sub_group(chai: DataGrouping) -> None:
    assert run("chai-archived").splitlines() == [
        "all         6",
        "chai-archived: 6 packages in 1 sub-group",
    ]


def test_json_output_is_the_preview(chai: DataGrouping) -> None:
    assert json.loads(run("chai-archived", "--group-by", "source", "--json")) == [
        {"key": "source=M82", "values": {"source": "M82"}, "count": 2},
        {"key": "source=NGC253", "values": {"source": "NGC253"}, "count": 4},
    ]


def test_an_unknown_grouping_is_a_command_error_naming_the_known_ones(chai: DataGrouping) -> None:
    with pytest.raises(CommandError, match="no data grouping named 'chai'; known: chai-archived"):
        run("chai")


def test_an_unknown_group_by_key_is_a_command_error(chai: DataGrouping) -> None:
    with pytest.raises(CommandError, match="unknown group_by key 'scan'; known: executed_obs_unit"):
        run("chai-archived", "--group-by", "scan")


def test_a_grouping_with_invalid_stored_rules_is_a_command_error_naming_the_rule() -> None:
    DataGroupingFactory(name="broken", filter_rules=[rule("Source", "nme", "eq", "x")])

    with pytest.raises(CommandError, match=r"broken: rule 1 \(Source.nme eq 'x'\): unknown column"):
        run("broken")


def test_an_unknown_option_exits_non_zero() -> None:
    with pytest.raises(CommandError, match="unrecognized arguments: --bogus"):
        call_command("grouping_preview", "x", "--bogus")


def test_unsaved_rules_can_be_previewed_before_saving_them(chai: DataGrouping) -> None:
    rules = json.dumps([rule("Source", "name", "eq", "NGC253")])

    assert run("--rules", rules).splitlines()[-1] == "rules: 4 packages in 1 sub-group"
    assert run("--rules", rules, "--instrument-module", "CHAI/LFA").splitlines()[-1] == (
        "rules: 2 packages in 1 sub-group"
    )
    assert DataGrouping.objects.count() == 1  # nothing saved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rules", "[{"], "--rules is not JSON"),
        (
            ["--rules", json.dumps([rule("Source", "nme", "eq", "x")])],
            r"rules: rule 1 \(Source.nme eq 'x'\): unknown column 'nme'",
        ),
        (["--rules", "[]", "--instrument-module", "CHAI/XYZ"], "no instrument module 'CHAI/XYZ'"),
        (["chai-archived", "--rules", "[]"], "name a data grouping or give --rules, not both"),
        ([], "not both or neither"),
        (["chai-archived", "--instrument-module", "CHAI/LFA"], "goes with --rules"),
    ],
)
def test_bad_rules_or_options_are_a_command_error(
    chai: DataGrouping, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert DataGrouping.objects.count() == 1
