"""The filter engine: a DataGrouping's rules -> one SQL query over RawDataPackage; sub-groups.

Rules (workflow manager §3.2) are JSON objects ``{table, column, operator, value[, json_path]}``,
all ANDed. ``table`` is a logical name from ``TABLES`` (``Source``, ``Line``, ``InstrumentModule``,
...; snake case such as ``obs_unit`` is accepted too); the engine adds the joins from
RawDataPackage through Django lookups, so every grouping resolves in ONE query on PostgreSQL and
SQLite alike and nothing is filtered in Python. The trigger manager, the admin preview and
``manage.py grouping_preview`` all go through ``grouping_queryset``.

Semantics, chosen so both databases answer identically:

- ``eq neq in not_in gt gte lt lte`` are SQL's ``= != IN NOT IN > >= < <=``. As in SQL, a NULL
  (a package whose obs unit has no line, say) matches no rule, ``neq`` and ``not_in`` included.
- ``gt gte lt lte`` need a number, date or time column: text order depends on the database's
  collation (PostgreSQL's locale, SQLite's bytes), so ordering text is refused, not guessed.
- ``like`` is SQL LIKE with ``%`` (any run of characters) and ``_`` (one character), matched
  CASE-SENSITIVELY on both databases (SQLite's own LIKE ignores case, so there it is compiled to
  GLOB); a backslash makes the next character literal (``100\\%``).
- A ``json_path`` rule drills into a JSON column (``metadata``, ``conditions``) and only ever
  matches values of the rule value's JSON type: ``gt 400`` looks at numbers, so a package whose
  path is missing, null, or holds the string "460" does not match, whichever operator.

A grouping is validated when saved (``DataGrouping.clean``) and again whenever it is resolved, so
a rule written around the model never reaches SQL.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db import NotSupportedError, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Count, F, Func, Lookup, Q, QuerySet
from django.db.models.fields.json import (  # type: ignore[attr-defined]
    KeyTextTransform,
    KeyTransform,
    compile_json_path,
)
from django.db.models.sql.compiler import SQLCompiler
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from pipelines.models import (
    DataGrouping,
    ExecutedObsUnit,
    Instrument,
    InstrumentModule,
    Line,
    ObservingProgram,
    ObsMode,
    ObsUnit,
    RawDataPackage,
    Source,
    SubObservingProgram,
    Telescope,
)

# Logical table name -> (model, ORM path from RawDataPackage). Adding a table the observation
# model can reach through foreign keys is one line here; rules name it at once.
TABLES: dict[str, tuple[type[models.Model], str]] = {
    "RawDataPackage": (RawDataPackage, ""),
    "ExecutedObsUnit": (ExecutedObsUnit, "executed_obs_unit"),
    "ObsUnit": (ObsUnit, "executed_obs_unit__obs_unit"),
    "Source": (Source, "executed_obs_unit__obs_unit__source"),
    "Line": (Line, "executed_obs_unit__obs_unit__line"),
    "ObsMode": (ObsMode, "executed_obs_unit__obs_unit__obs_mode"),
    "ObservingProgram": (ObservingProgram, "executed_obs_unit__obs_unit__observing_program"),
    "SubObservingProgram": (
        SubObservingProgram,
        "executed_obs_unit__obs_unit__sub_observing_program",
    ),
    "InstrumentModule": (InstrumentModule, "instrument_module"),
    "Instrument": (Instrument, "instrument_module__instrument"),
    "Telescope": (Telescope, "instrument_module__instrument__telescope"),
}

OPERATORS = ("eq", "neq", "in", "not_in", "gt", "gte", "lt", "lte", "like")
_ORDERING = ("gt", "gte", "lt", "lte")
_LISTS = ("in", "not_in")
_RULE_KEYS = ("table", "column", "operator", "value", "json_path")
MAX_RULES = 50
MAX_LIST_VALUES = 1000
MAX_PATTERN_LENGTH = 500
_JSON_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_JSON_DEPTH = 8

# group_by dimension -> the columns (from RawDataPackage) whose values name a sub-group. Names,
# not ids, where the name is unique (source, line, obs unit, programme short name), so keys read
# as "source=NGC253;line=CO43"; a scan by its UUID; a module as "CHAI/LFA" (module names are
# unique per instrument, instrument names per facility).
GROUP_BY_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "executed_obs_unit": ("executed_obs_unit_id",),
    "obs_unit": ("executed_obs_unit__obs_unit__name",),
    "source": ("executed_obs_unit__obs_unit__source__name",),
    "line": ("executed_obs_unit__obs_unit__line__name",),
    "obs_mode": ("executed_obs_unit__obs_unit__obs_mode__name",),
    "observing_program": ("executed_obs_unit__obs_unit__observing_program__short_name",),
    "instrument": ("instrument_module__instrument__name",),
    "instrument_module": ("instrument_module__instrument__name", "instrument_module__name"),
}
METADATA_PREFIX = "metadata."
MAX_GROUP_BY = 8
SUB_GROUP_KEY_MAX = 200
ALL = "all"


class FilterRuleError(ValidationError):
    """One or more rules of a grouping are invalid. Each message names its rule:
    ``rule 2 (Source.nme eq 'NGC253'): unknown column 'nme'; known: ...``."""


# --- SQL building blocks -------------------------------------------------------------------------
class CaseSensitiveLike(Lookup):
    """``lhs LIKE pattern`` matched case-sensitively on PostgreSQL and SQLite alike.

    Pattern language: ``%`` any run of characters, ``_`` one character, ``\\`` makes the next
    character literal. PostgreSQL's LIKE is case-sensitive already (the ESCAPE clause pins the
    escape character); SQLite's LIKE is not, so there the pattern is translated to GLOB, which
    is. Used as an expression (``qs.filter(CaseSensitiveLike(F(...), "NGC%"))``); not registered
    on any field, so no model grows a surprise ``__like`` lookup.
    """

    lookup_name = "like"
    prepare_rhs = False

    def as_sql(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper
    ) -> tuple[str, tuple[Any, ...]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        # The escape character goes as a parameter: a literal '\' would depend on the server's
        # standard_conforming_strings setting.
        return f"{lhs} LIKE {rhs} ESCAPE %s", (*lhs_params, *rhs_params, "\\")

    def as_sqlite(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper
    ) -> tuple[str, tuple[Any, ...]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        globs = [like_to_glob(p) if isinstance(p, str) else p for p in rhs_params]
        return f"{lhs} GLOB {rhs}", (*lhs_params, *globs)


def like_to_glob(pattern: str) -> str:
    """Translate a LIKE pattern (``%``, ``_``, ``\\`` escape) to the equivalent SQLite GLOB
    pattern; GLOB's own wildcards ``* ? [`` in the text are made literal as ``[*] [?] [[]``."""
    out: list[str] = []
    chars = iter(pattern)
    for ch in chars:
        if ch == "\\":
            ch = next(chars, "")
            if not ch:
                raise ValueError("a LIKE pattern cannot end with the escape character '\\'")
            out.append(f"[{ch}]" if ch in "*?[" else ch)
        elif ch == "%":
            out.append("*")
        elif ch == "_":
            out.append("?")
        elif ch in "*?[":
            out.append(f"[{ch}]")
        else:
            out.append(ch)
    return "".join(out)


class JSONTypeOf(Func):
    """The JSON type of a key path, in one vocabulary on both databases: ``number``, ``string``,
    ``boolean``, ``null``, ``object``, ``array``, or SQL NULL when the path is missing. The
    filter engine pins every json_path rule to its value's type with it."""

    output_field = models.CharField()

    def __init__(self, key_transform: KeyTransform) -> None:
        super().__init__(key_transform)

    def as_sql(  # type: ignore[override]
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> tuple[str, tuple[Any, ...]]:
        raise NotSupportedError(
            "the filter engine's json_path rules run on PostgreSQL and SQLite, not "
            f"{connection.vendor}"
        )

    def as_postgresql(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> tuple[str, tuple[Any, ...]]:
        # jsonb: the key transform compiles to a jsonb expression (SQL NULL when missing).
        sql, params = compiler.compile(self.get_source_expressions()[0])
        return f"jsonb_typeof({sql})", tuple(params)

    def as_sqlite(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: Any
    ) -> tuple[str, tuple[Any, ...]]:
        key_transform = self.get_source_expressions()[0]
        lhs, params, keys = key_transform.preprocess_lhs(compiler, connection)
        path = compile_json_path(keys)
        sql = (
            f"(CASE JSON_TYPE({lhs}, %s) WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' "
            f"WHEN 'text' THEN 'string' WHEN 'true' THEN 'boolean' WHEN 'false' THEN 'boolean' "
            f"ELSE JSON_TYPE({lhs}, %s) END)"
        )
        return sql, (*params, path, *params, path)


# --- Validation ----------------------------------------------------------------------------------
# The kinds of value a column holds, and the operators each kind takes.
_KIND_OPERATORS: dict[str, tuple[str, ...]] = {
    "text": ("eq", "neq", "in", "not_in", "like"),
    "integer": ("eq", "neq", "in", "not_in", *_ORDERING),
    "number": ("eq", "neq", "in", "not_in", *_ORDERING),
    "datetime": ("eq", "neq", "in", "not_in", *_ORDERING),
    "date": ("eq", "neq", "in", "not_in", *_ORDERING),
    "boolean": ("eq", "neq", "in", "not_in"),
    "uuid": ("eq", "neq", "in", "not_in"),
    "json": (),  # needs a json_path; the value's JSON type decides (see _json_kind)
}
_KIND_WORDS = {
    "text": "text",
    "integer": "an integer",
    "number": "a number",
    "datetime": "an ISO date-time such as '2026-01-31T12:00:00Z'",
    "date": "an ISO date such as '2026-01-31'",
    "boolean": "true or false",
    "uuid": "a UUID",
}


def _canonical_table(name: object) -> str | None:
    if not isinstance(name, str):
        return None
    wanted = name.replace("_", "").lower()
    for table in TABLES:
        if table.lower() == wanted:
            return table
    return None


def _columns(model: type[models.Model]) -> dict[str, models.Field]:
    """Column name (``attname``: ``line_id`` for a foreign key) -> field."""
    return {f.attname: f for f in model._meta.concrete_fields}


def _field_kind(field: models.Field) -> str:
    if isinstance(field, models.ForeignKey):
        return _field_kind(field.target_field)
    if isinstance(field, models.JSONField):
        return "json"
    if isinstance(field, models.BooleanField):
        return "boolean"
    if isinstance(field, models.UUIDField):
        return "uuid"
    if isinstance(field, models.DateTimeField):
        return "datetime"
    if isinstance(field, models.DateField):
        return "date"
    if isinstance(field, (models.IntegerField, models.AutoField)):
        return "integer"
    if isinstance(field, (models.FloatField, models.DecimalField)):
        return "number"
    return "text"


def _describe(index: int, rule: object) -> str:
    if not isinstance(rule, dict):
        return f"rule {index} ({rule!r})"
    path = f"[{rule['json_path']}]" if rule.get("json_path") else ""
    return (
        f"rule {index} ({rule.get('table')}.{rule.get('column')}{path} "
        f"{rule.get('operator')} {rule.get('value')!r})"
    )


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and not math.isfinite(value))
    )


def _check_scalar(kind: str, value: object, field: models.Field | None) -> object:
    """The value normalised for ``kind``; ValueError with the reason otherwise."""
    if value is None:
        raise ValueError("null is not a value any rule can compare with")
    if kind == "text":
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not text")
        if "\x00" in value:
            raise ValueError(f"{value!r} contains a NUL character, which no database stores")
        choices = [str(c[0]) for c in field.flatchoices] if field and field.choices else []
        if choices and value not in choices:
            raise ValueError(f"{value!r} is not one of: {', '.join(choices)}")
        return value
    if kind == "integer":
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{value!r} is not an integer")
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{value} is outside the 64-bit range of database integers")
        return value
    if kind == "number":
        if not _is_number(value):
            raise ValueError(f"{value!r} is not a number")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError(f"{value} is outside the 64-bit range of database integers")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if kind == "uuid":
        parsed = _safe(uuid.UUID, value) if isinstance(value, str) else None
        if parsed is None:
            raise ValueError(f"{value!r} is not a UUID")
        return str(parsed)
    if kind == "datetime":
        if not isinstance(value, str) or _parse_datetime(value) is None:
            raise ValueError(f"{value!r} is not {_KIND_WORDS['datetime']}")
        return value
    if kind == "date":
        if not isinstance(value, str) or _safe(parse_date, value) is None:
            raise ValueError(f"{value!r} is not {_KIND_WORDS['date']}")
        return value
    raise ValueError(f"unsupported column kind {kind}")  # pragma: no cover - registry mistake


def _safe(parse: Any, value: str) -> Any:
    try:
        return parse(value)
    except ValueError:
        return None


def _parse_datetime(value: str) -> Any:
    parsed = _safe(parse_datetime, value)
    if parsed is None:
        day = _safe(parse_date, value)
        if day is None:
            return None
        parsed = parse_datetime(f"{value}T00:00:00")
    if timezone.is_naive(parsed):
        # A time without an offset is read in the site's time zone, as the admin reads it.
        parsed = timezone.make_aware(parsed)
    return parsed


def _json_kind(value: object) -> str:
    """The JSON type a json_path rule's value pins it to."""
    sample = value[0] if isinstance(value, list) and value else value
    if isinstance(sample, bool):
        return "boolean"
    if _is_number(sample):
        return "number"
    if isinstance(sample, str):
        return "string"
    raise ValueError(f"{sample!r}: a json_path rule compares with a string, number or boolean")


def _check_like(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise ValueError(f"like needs a text pattern, not {pattern!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"a like pattern has at most {MAX_PATTERN_LENGTH} characters")
    if "\x00" in pattern:
        raise ValueError(f"{pattern!r} contains a NUL character, which no database stores")
    like_to_glob(pattern)  # raises on a trailing escape character
    return pattern


def _check_rule(rule: object) -> dict[str, Any]:
    """One rule normalised; ValueError with the reason (without the rule's name)."""
    if not isinstance(rule, dict):
        raise ValueError("a rule is an object with table, column, operator and value")
    unknown_keys = sorted(set(rule) - set(_RULE_KEYS))
    if unknown_keys:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown_keys))}; a rule has "
            f"{', '.join(_RULE_KEYS)}"
        )
    missing = [key for key in ("table", "column", "operator", "value") if key not in rule]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    table = _canonical_table(rule["table"])
    if table is None:
        raise ValueError(f"unknown table {rule['table']!r}; known: {', '.join(TABLES)}")
    model = TABLES[table][0]
    columns = _columns(model)
    column = rule["column"]
    if not isinstance(column, str) or column not in columns:
        hint = ""
        try:
            linked = model._meta.get_field(column) if isinstance(column, str) else None
        except FieldDoesNotExist:
            linked = None
        if isinstance(linked, models.ForeignKey):
            target = _canonical_table(linked.related_model.__name__)
            hint = f" ({column!r} is a link: use {linked.attname} for its id"
            hint += f", or table {target} to match by its columns)" if target else ")"
        raise ValueError(f"unknown column {column!r}{hint}; known: {', '.join(sorted(columns))}")
    field: models.Field | None = columns[column]
    kind = _field_kind(columns[column])
    operator = rule["operator"]
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; known: {', '.join(OPERATORS)}")
    value = rule["value"]
    json_path = rule.get("json_path")
    normal: dict[str, Any] = {"table": table, "column": column, "operator": operator}

    if kind == "json":
        if not json_path:
            raise ValueError(
                f"{table}.{column} is a JSON column: give a json_path such as "
                "'observation.frequency_ghz'"
            )
        keys = json_path.split(".") if isinstance(json_path, str) else []
        if not keys or len(keys) > _JSON_DEPTH or not all(_JSON_KEY.match(k) for k in keys):
            raise ValueError(
                f"json_path {json_path!r}: use dot-separated keys of letters, digits, '_' and "
                f"'-' (each starting with a letter or '_', at most {_JSON_DEPTH} deep)"
            )
        json_type = _json_kind(value)
        if operator == "like" and json_type != "string":
            raise ValueError("like needs a text pattern")
        if operator in _ORDERING and json_type != "number":
            raise ValueError(f"{operator} on a json_path compares numbers, not {value!r}")
        kind = {"boolean": "boolean", "number": "number", "string": "text"}[json_type]
        normal["json_path"] = json_path
        field = None  # choices never apply inside JSON
    elif json_path:
        raise ValueError(f"{table}.{column} is not a JSON column, so it takes no json_path")
    elif operator not in _KIND_OPERATORS[kind]:
        raise ValueError(
            f"{operator} does not apply to {table}.{column} ({kind}); use one of: "
            f"{', '.join(_KIND_OPERATORS[kind])}"
        )

    if operator == "like":
        normal["value"] = _check_like(value)
    elif operator in _LISTS:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{operator} needs a non-empty list of values, not {value!r}")
        if len(value) > MAX_LIST_VALUES:
            raise ValueError(f"{operator} takes at most {MAX_LIST_VALUES} values")
        normal["value"] = [_check_value(kind, item, field, table, column) for item in value]
    else:
        normal["value"] = _check_value(kind, value, field, table, column)
    return normal


def _check_value(
    kind: str, value: object, field: models.Field | None, table: str, column: str
) -> object:
    try:
        return _check_scalar(kind, value, field)
    except ValueError as exc:
        expected = _KIND_WORDS.get(kind, kind)
        hint = ""
        if isinstance(field, models.ForeignKey):
            target = _canonical_table(field.related_model.__name__)
            if target:
                hint = f"; to match a {target} by name use table {target}, column name"
            expected = f"{field.related_model.__name__} ids ({expected})"
        if "not one of" in str(exc):
            raise
        raise ValueError(f"{table}.{column} holds {expected}: {exc}{hint}") from None


def validate_filter_rules(rules: object) -> list[dict[str, Any]]:
    """The rules normalised (canonical table names, UUIDs in canonical form), or
    FilterRuleError naming every bad rule (1-based). ``[]`` is valid: a grouping without rules
    selects every package (of its instrument module, when it has one)."""
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        raise FilterRuleError(f"filter rules are a list of rule objects, not {rules!r}")
    if len(rules) > MAX_RULES:
        raise FilterRuleError(f"at most {MAX_RULES} rules, not {len(rules)}")
    normal: list[dict[str, Any]] = []
    errors: list[str] = []
    for index, rule in enumerate(rules, start=1):
        try:
            normal.append(_check_rule(rule))
        except ValueError as exc:
            errors.append(f"{_describe(index, rule)}: {exc}")
    if errors:
        raise FilterRuleError(errors)
    return normal


def validate_group_by(group_by: object) -> list[str]:
    """The group_by list as given, or ValidationError naming the bad key. Keys: those of
    ``GROUP_BY_DIMENSIONS`` and ``metadata.<dotted.path>`` (into RawDataPackage.metadata);
    ``[]`` puts all matching data in one sub-group."""
    if group_by is None:
        return []
    if not isinstance(group_by, list):
        raise ValidationError(f"group_by is a list of keys, not {group_by!r}")
    if len(group_by) > MAX_GROUP_BY:
        raise ValidationError(f"group_by takes at most {MAX_GROUP_BY} keys")
    known = ", ".join([*GROUP_BY_DIMENSIONS, "metadata.<dotted.path>"])
    seen: set[str] = set()
    for key in group_by:
        if not isinstance(key, str):
            raise ValidationError(f"group_by key {key!r} is not text; known: {known}")
        if key in seen:
            raise ValidationError(f"group_by key {key!r} appears twice")
        seen.add(key)
        if key in GROUP_BY_DIMENSIONS:
            continue
        if key.startswith(METADATA_PREFIX):
            keys = key[len(METADATA_PREFIX) :].split(".")
            if len(keys) <= _JSON_DEPTH and all(_JSON_KEY.match(k) for k in keys):
                continue
            raise ValidationError(
                f"group_by key {key!r}: the metadata path must be dot-separated keys of "
                "letters, digits, '_' and '-'"
            )
        raise ValidationError(f"unknown group_by key {key!r}; known: {known}")
    return list(group_by)


# --- Resolution ----------------------------------------------------------------------------------
def _path(table: str, column: str) -> str:
    prefix = TABLES[table][1]
    return f"{prefix}__{column}" if prefix else column


def _key_transform(base: str, keys: list[str], *, text: bool = False) -> KeyTransform:
    expression: Any = F(base)
    for position, key in enumerate(keys):
        last = position == len(keys) - 1
        expression = (KeyTextTransform if text and last else KeyTransform)(key, expression)
    return expression


def _sql_value(kind: str, value: Any) -> Any:
    if kind == "datetime":
        return _parse_datetime(value)
    if kind == "date":
        return parse_date(value)
    return value


def _rule_condition(
    index: int, rule: dict[str, Any], aliases: dict[str, Any]
) -> Q | CaseSensitiveLike:
    """The WHERE condition of one normalised rule; JSON rules add their aliases."""
    table, column, operator, value = rule["table"], rule["column"], rule["operator"], rule["value"]
    path = _path(table, column)
    if rule.get("json_path"):
        keys = rule["json_path"].split(".")
        json_type = _json_kind(value)
        type_alias, value_alias = f"_rule{index}_type", f"_rule{index}_value"
        aliases[type_alias] = JSONTypeOf(_key_transform(path, keys))
        guard = Q(**{type_alias: json_type})
        if operator == "like":
            return guard & Q(CaseSensitiveLike(_key_transform(path, keys, text=True), value))
        aliases[value_alias] = _key_transform(path, keys)
        lookup = {"eq": "exact", "neq": "exact", "not_in": "in"}.get(operator, operator)
        condition = Q(**{f"{value_alias}__{lookup}": value})
        return guard & (~condition if operator in ("neq", "not_in") else condition)

    field = _columns(TABLES[table][0])[column]
    kind = _field_kind(field)
    sql_value = (
        [_sql_value(kind, v) for v in value] if operator in _LISTS else _sql_value(kind, value)
    )
    if operator == "like":
        return Q(CaseSensitiveLike(F(path), value))
    if operator == "eq":
        return Q(**{path: sql_value})
    if operator == "neq":
        # SQL semantics: NULL != x is not true, so NULLs are left out explicitly (Django's
        # exclude() would keep them).
        return Q(**{f"{path}__isnull": False}) & ~Q(**{path: sql_value})
    if operator == "not_in":
        return Q(**{f"{path}__isnull": False}) & ~Q(**{f"{path}__in": sql_value})
    return Q(**{f"{path}__{operator}": sql_value})


def _build_queryset(rules: object, instrument_module_id: int | None) -> QuerySet[RawDataPackage]:
    normal = validate_filter_rules(rules)
    aliases: dict[str, Any] = {}
    conditions: list[Any] = [
        _rule_condition(i, rule, aliases) for i, rule in enumerate(normal, start=1)
    ]
    if instrument_module_id is not None:
        conditions.append(Q(instrument_module_id=instrument_module_id))
    queryset = RawDataPackage.objects.all()
    if aliases:
        queryset = queryset.alias(**aliases)
    # One filter() call: each call clones the query, which is most of the cost of building it.
    return queryset.filter(*conditions).order_by("pk")


# Building a grouping's query (validation, joins, lookups) costs about a millisecond; cloning a
# built one costs microseconds. The trigger manager resolves every grouping each tick, so built
# queries are kept, keyed by the rules' JSON: a changed rule is a new key, so nothing is ever
# stale. About 6 KiB each: room for the largest facility's groupings without thrashing.
_QUERY_CACHE_SIZE = 16384


@functools.lru_cache(maxsize=_QUERY_CACHE_SIZE)
def _cached_queryset(
    rules_json: str, instrument_module_id: int | None, time_zone: str
) -> QuerySet[RawDataPackage]:
    # time_zone: naive date-times in rules are read in the current zone when the query is built.
    return _build_queryset(json.loads(rules_json), instrument_module_id)


def rules_queryset(
    rules: object, *, instrument_module_id: int | None = None
) -> QuerySet[RawDataPackage]:
    """The packages matching ``rules`` (validated here: FilterRuleError) and, when given, of
    that instrument module; ordered by id. Lazy: evaluating it is one SQL query. Each call
    returns a fresh clone, so callers may filter it further."""
    try:
        key = json.dumps(rules, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return _build_queryset(rules, instrument_module_id)  # not JSON: validation says why
    time_zone = timezone.get_current_timezone_name()
    return _cached_queryset(key, instrument_module_id, time_zone).all()


def grouping_queryset(grouping: DataGrouping) -> QuerySet[RawDataPackage]:
    """The RawDataPackages of ``grouping``: every rule ANDed, ``grouping.instrument_module``
    applied, ordered by id; one SQL query when evaluated, nothing filtered in Python. Adds no
    state filter of its own (a rule may: ``RawDataPackage.state eq archived``). Raises
    FilterRuleError when the stored rules are invalid (edited around ``clean()``)."""
    return rules_queryset(grouping.filter_rules, instrument_module_id=grouping.instrument_module_id)


# --- Sub-groups ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubGroup:
    """One sub-group of a step: its key, the value of each group_by dimension (JSON-safe, the
    run's ``sub_group_values``) and its packages' ids, ascending."""

    key: str
    values: dict[str, Any]
    package_ids: list[int] = field(default_factory=list)


def _escape(text: str) -> str:
    # The key's own separators (and the escape character) are percent-encoded so that
    # "source=a;line=b" can only come from those two values.
    return "".join(
        f"%{ord(ch):02X}" if ch in "%;=~" or ord(ch) < 32 or ord(ch) == 127 else ch for ch in text
    )


def _render(value: object) -> str:
    if value is None:
        return "~"  # distinct from every escaped text, including ""
    if isinstance(value, str):
        return _escape(value)
    if isinstance(value, uuid.UUID):
        return str(value)  # the same key whether a caller passes the UUID or its text
    return _escape(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str))


def sub_group_key(group_by: list[str], values: dict[str, object]) -> str:
    """A stable, readable key for one sub-group: ``all`` for ``group_by == []``, else
    ``dim=value`` pairs in group_by order joined by ``;`` (``source=NGC253;line=CO43``); text
    values are percent-escaped where they contain ``% ; = ~`` or control characters, a missing
    value reads ``~``. At most 200 characters: a longer key keeps its first 183 and ends with
    ``#`` and 16 hex digits of the SHA-256 of the whole key. Not a path: the run directory
    makes it filesystem-safe."""
    if not group_by:
        return ALL
    key = ";".join(f"{dim}={_render(values.get(dim))}" for dim in group_by)
    if len(key) > SUB_GROUP_KEY_MAX:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        key = f"{key[: SUB_GROUP_KEY_MAX - 17]}#{digest}"
    return key


def _dimension_columns(group_by: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The column names to select for ``group_by`` (in order) and the annotations they need."""
    columns: list[str] = []
    annotations: dict[str, Any] = {}
    for position, dim in enumerate(group_by):
        if dim in GROUP_BY_DIMENSIONS:
            columns.extend(GROUP_BY_DIMENSIONS[dim])
        else:
            name = f"_group{position}"
            annotations[name] = _key_transform("metadata", dim[len(METADATA_PREFIX) :].split("."))
            columns.append(name)
    return columns, annotations


def _dimension_values(group_by: list[str], row: Iterable[Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    cells = iter(row)
    for dim in group_by:
        width = len(GROUP_BY_DIMENSIONS.get(dim, ("metadata",)))
        parts = [next(cells) for _ in range(width)]
        if dim == "executed_obs_unit":
            values[dim] = str(parts[0]) if parts[0] is not None else None
        elif width > 1:
            values[dim] = None if None in parts else "/".join(str(p) for p in parts)
        else:
            values[dim] = parts[0]
    return values


def package_sub_groups(
    queryset: QuerySet[RawDataPackage], group_by: list[str]
) -> dict[str, SubGroup]:
    """``queryset``'s packages split by ``group_by``: key -> SubGroup, keys ascending, package
    ids ascending. One query (the ids and the dimension columns); no sub-group without
    packages. ValidationError for an invalid group_by."""
    group_by = validate_group_by(group_by)
    columns, annotations = _dimension_columns(group_by)
    rows = queryset.annotate(**annotations).order_by("pk").values_list("pk", *columns)
    groups: dict[str, SubGroup] = {}
    for pk, *cells in rows:
        values = _dimension_values(group_by, cells)
        key = sub_group_key(group_by, values)
        group = groups.get(key)
        if group is None:
            group = groups[key] = SubGroup(key=key, values=values)
        group.package_ids.append(pk)
    return dict(sorted(groups.items()))


def preview(grouping: DataGrouping, group_by: list[str]) -> list[dict[str, Any]]:
    """Counts per sub-group of ``grouping`` split by ``group_by``: ``[{"key", "values",
    "count"}]`` ordered by key, ``[]`` when nothing matches. One aggregate query (GROUP BY the
    dimension columns); no package row is loaded. FilterRuleError / ValidationError on invalid
    rules or group_by."""
    group_by = validate_group_by(group_by)
    queryset = grouping_queryset(grouping).order_by()
    if not group_by:
        count = queryset.aggregate(count=Count("pk"))["count"]
        return [{"key": ALL, "values": {}, "count": count}] if count else []
    columns, annotations = _dimension_columns(group_by)
    rows = (
        queryset.annotate(**annotations)
        .values(*columns)
        .annotate(_count=Count("pk"))
        .values_list(*columns, "_count")
        .order_by()
    )
    counts: dict[str, dict[str, Any]] = {}
    for *cells, count in rows:
        values = _dimension_values(group_by, cells)
        key = sub_group_key(group_by, values)
        # Two database values can render to one key (a metadata string "5" and number 5): their
        # packages form one sub-group in package_sub_groups too, so their counts add up.
        entry = counts.setdefault(key, {"key": key, "values": values, "count": 0})
        entry["count"] += count
    return [counts[key] for key in sorted(counts)]
