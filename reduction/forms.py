"""Field types shared by the instrument forms, and the base form every instrument form extends.

A reduction form is the parameter schema of one instrument: its fields are the template keys,
each field's ``initial`` is the default, and ``clean()`` holds the cross-field rules. Forms only
validate; ``reduction.services`` writes.

Values travel as JSON (``ReductionProperty.value`` is a JSONField). Every field here converts a
stored JSON value to the text shown in the widget (``prepare_value``) and the submitted text back
to JSON (``clean``), and the round trip is the identity, so a stored value re-validates exactly.
Nothing is ever evaluated: masks and lists are parsed with small explicit grammars.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from django import forms
from django.core.exceptions import ValidationError

# --- Characters ----------------------------------------------------------------------------------

# Unicode categories refused in every value: control (Cc), format (Cf: zero-width and
# direction-overriding characters such as U+200B and U+202E), line and paragraph separators (Zl,
# Zp). They are invisible or reorder what an operator reads, and a line break inside a path or a
# number would start a new line in the rendered script.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
# unicodedata has no names for control characters.
_CONTROL_NAMES = {
    "\x00": "NULL",
    "\t": "CHARACTER TABULATION",
    "\n": "LINE FEED",
    "\x0b": "LINE TABULATION",
    "\x0c": "FORM FEED",
    "\r": "CARRIAGE RETURN",
    "\x1b": "ESCAPE",
    "\x7f": "DELETE",
    "\x85": "NEXT LINE",
}


def describe_character(ch: str) -> str:
    """``"U+202E RIGHT-TO-LEFT OVERRIDE"``: how an error message names a character."""
    name = _CONTROL_NAMES.get(ch) or unicodedata.name(ch, "") or "control character"
    return f"U+{ord(ch):04X} {name}"


def forbidden_character(text: str, *, multiline: bool = False) -> str | None:
    """The first character of ``text`` in a refused category (see _FORBIDDEN_CATEGORIES), or
    None. ``multiline`` allows line breaks: ``\\n``, and ``\\r\\n`` as browsers send a
    textarea's lines; nothing else (not even a tab)."""
    if multiline:
        text = text.replace("\r\n", "\n")
    for ch in text:
        if multiline and ch == "\n":
            continue
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            return ch
    return None


def forbidden_character_message(ch: str) -> str:
    return f"must not contain {describe_character(ch)} (an invisible or control character)"


# --- Numbers -------------------------------------------------------------------------------------

# What the number fields accept: ASCII digits, one optional sign, decimal point and exponent.
# Narrower than float()/int(), which also take "1_0" (as 10), other scripts' digits and
# surrounding Unicode blanks; none of that is a number an operator meant to type.
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(?:\.0*)?")
_NON_FINITE_WORDS = frozenset({"inf", "infinity", "nan"})


def parse_number(text: str) -> float:
    """``text`` (surrounding blanks removed) as a finite float, or ValidationError saying that it
    is not a number, not a finite one, or out of range (``1e999``, which float() makes inf)."""
    item = text.strip()
    if not _DECIMAL_TEXT.fullmatch(item):
        if item.lower().lstrip("+-") in _NON_FINITE_WORDS:
            raise ValidationError("%(item)r is not a finite number", params={"item": item})
        raise ValidationError("%(item)r is not a number", params={"item": _shorten(item)})
    number = float(item)
    if not math.isfinite(number):
        raise ValidationError("%(item)s is out of range", params={"item": _shorten(item)})
    return number


class FloatField(forms.FloatField):
    """A float typed as text: ASCII decimal or scientific notation only (see parse_number).

    The widget is a text input with ``inputmode="decimal"``, not ``type=number``: a browser blanks
    a number input it cannot represent (``1e999``) before sending it, and the server could then
    only say "required"; as text, what was typed comes back with the reason."""

    widget = forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"})

    def to_python(self, value: Any) -> float | None:  # type: ignore[override]
        if value in self.empty_values:
            return None
        text = str(value).strip()
        if not text:
            return None
        try:
            return parse_number(text)
        except ValidationError as exc:
            message = exc.messages[0]
            if "out of range" in message:
                raise ValidationError(
                    _with_bounds(message, self.min_value, self.max_value)
                ) from None
            raise ValidationError(f"Enter a number: {message}") from None


def _with_bounds(message: str, minimum: Any, maximum: Any) -> str:
    """``message`` followed by the allowed range, e.g. "(at least 0 and at most 5)"."""
    bounds = []
    if minimum is not None:
        bounds.append(f"at least {minimum}")
    if maximum is not None:
        bounds.append(f"at most {maximum}")
    return f"{message} ({' and '.join(bounds)})" if bounds else message


class IntegerField(forms.IntegerField):
    """A whole number typed as text: ASCII digits with an optional sign (``2.0`` allowed, as a
    JSON import may hold it); no underscores, no other scripts' digits. Text input like
    FloatField, for the same reason."""

    widget = forms.TextInput(attrs={"inputmode": "numeric", "autocomplete": "off"})

    def to_python(self, value: Any) -> int | None:
        if value in self.empty_values:
            return None
        text = str(value).strip()
        if not text:
            return None
        if not _INTEGER_TEXT.fullmatch(text):
            raise ValidationError(
                "Enter a whole number: %(item)r is not a whole number",
                params={"item": _shorten(text)},
            )
        digits = text.split(".", 1)[0]
        if len(digits.lstrip("+-")) > 18:
            # Also keeps int() clear of Python's 4300-digit conversion limit.
            raise ValidationError(
                _with_bounds(f"{_shorten(text)} is out of range", self.min_value, self.max_value)
            )
        return int(digits)


# --- Integer range lists ("1,3-5") ---------------------------------------------------------------

_RANGE_ITEM = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")
# No detector, pixel or bank index comes near this; it also keeps int() clear of Python's
# 4300-digit conversion limit, which would otherwise raise ValueError instead of a form error.
_MAX_INDEX_DIGITS = 9

# Longest text accepted by the list and mask fields: far above any real mask or list, far below
# what would bloat the stored values and the rendered script.
LIST_MAX_LENGTH = 2000
MASK_MAX_LENGTH = 10000


def _shorten(text: str, limit: int = 20) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def parse_int_ranges(
    text: str, *, minimum: int | None = None, maximum: int | None = None
) -> list[tuple[int, int]]:
    """Parse ``"1,3-5"`` into ``[(1, 1), (3, 5)]``.

    Raises ValidationError for anything else: negative numbers, descending ranges, values outside
    ``[minimum, maximum]``, empty items. Overlapping items are allowed (masking twice is harmless).
    """
    items = text.split(",")
    ranges: list[tuple[int, int]] = []
    for item in items:
        match = _RANGE_ITEM.match(item)
        if not match:
            raise ValidationError(
                "%(item)r is not a number or a range like 3-5", params={"item": item.strip()}
            )
        if any(len(n) > _MAX_INDEX_DIGITS for n in match.groups() if n is not None):
            raise ValidationError(
                "%(item)s is too large (at most %(digits)s digits)",
                params={"item": _shorten(item.strip()), "digits": _MAX_INDEX_DIGITS},
            )
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValidationError("range %(item)s goes downwards", params={"item": item.strip()})
        if minimum is not None and low < minimum:
            raise ValidationError(
                "%(value)s is below the smallest allowed value %(minimum)s",
                params={"value": low, "minimum": minimum},
            )
        if maximum is not None and high > maximum:
            raise ValidationError(
                "%(value)s is above the largest allowed value %(maximum)s",
                params={"value": high, "maximum": maximum},
            )
        ranges.append((low, high))
    return ranges


def format_int_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


class IntegerRangeListField(forms.CharField):
    """``"1,3-5"`` → the canonical string ``"1,3-5"`` (spaces removed, order kept)."""

    def __init__(
        self, *, min_item: int | None = None, max_item: int | None = None, **kwargs: Any
    ) -> None:
        self.min_item = min_item
        self.max_item = max_item
        kwargs.setdefault("max_length", LIST_MAX_LENGTH)
        super().__init__(**kwargs)

    def clean(self, value: Any) -> str:
        text = super().clean(value)
        if not text:
            return ""
        return format_int_ranges(
            parse_int_ranges(text, minimum=self.min_item, maximum=self.max_item)
        )


# --- Float lists ("-0.5, 1e-3") ------------------------------------------------------------------


def _float_item(position: int, item: Any) -> str:
    """One item of a JSON list given to a FloatListField, as the text the field parses.

    Only JSON numbers: text, null, lists, objects and booleans (which Python would turn into
    1.0) are refused by position, as is an integer too large for a float, so that a bad import
    file is a field error and not a traceback."""
    if isinstance(item, bool) or not isinstance(item, int | float):
        raise ValidationError(
            "expected a list of numbers, item %(position)s is %(kind)s",
            params={"position": position, "kind": _type_name(item)},
        )
    try:
        return repr(float(item))
    except OverflowError:
        raise ValidationError(
            "expected a list of numbers, item %(position)s is too large",
            params={"position": position},
        ) from None


class FloatListField(forms.CharField):
    """Comma-separated floats, scientific notation included → ``list[float]``.

    ``length`` fixes the number of items (e.g. 3 for a vector); ``min_value``/``max_value``
    bound every item.
    """

    def __init__(
        self,
        *,
        length: int | None = None,
        min_value: float | None = None,
        max_value: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.length = length
        self.item_min = min_value
        self.item_max = max_value
        kwargs.setdefault("max_length", LIST_MAX_LENGTH)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(_float_item(i, v) for i, v in enumerate(value, start=1))
        return value

    def clean(self, value: Any) -> list[float]:
        text = super().clean(self.prepare_value(value))
        if not text:
            return []
        numbers: list[float] = []
        for item in text.split(","):
            number = parse_number(item)
            if self.item_min is not None and number < self.item_min:
                raise ValidationError(
                    "%(value)s is below %(minimum)s",
                    params={"value": number, "minimum": self.item_min},
                )
            if self.item_max is not None and number > self.item_max:
                raise ValidationError(
                    "%(value)s is above %(maximum)s",
                    params={"value": number, "maximum": self.item_max},
                )
            numbers.append(number)
        if self.length is not None and len(numbers) != self.length:
            raise ValidationError(
                "expected %(length)s numbers, got %(count)s",
                params={"length": self.length, "count": len(numbers)},
            )
        return numbers


# --- Name lists (motor and sample-environment log names) -----------------------------------------

_LOG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]*$")


class NameListField(forms.CharField):
    """Comma-separated log/PV names like ``"s1, SampleTemp"`` → ``list[str]``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", LIST_MAX_LENGTH)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for position, item in enumerate(value, start=1):
            # str() would turn null into the valid log name "None" and true into "True".
            if not isinstance(item, str):
                raise ValidationError(
                    "expected a list of names, item %(position)s is %(kind)s",
                    params={"position": position, "kind": _type_name(item)},
                )
        return ", ".join(value)

    def clean(self, value: Any) -> list[str]:
        text = super().clean(self.prepare_value(value))
        if not text:
            return []
        names = [item.strip() for item in text.split(",")]
        for name in names:
            if not _LOG_NAME.match(name):
                raise ValidationError(
                    "%(name)r is not a log name (letters, digits, _ . : -; starts with a letter)",
                    params={"name": name},
                )
        return names


# --- Absolute paths ------------------------------------------------------------------------------


class AbsolutePathField(forms.CharField):
    """An absolute POSIX path on the cluster, optionally with one of ``suffixes``.

    Existence is not checked: the web server usually cannot see the analysis file system; the
    reduction script checks at run time and says which file is missing.
    """

    def __init__(self, *, suffixes: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.suffixes = suffixes
        kwargs.setdefault("max_length", 500)
        super().__init__(**kwargs)

    def clean(self, value: Any) -> str:
        text = super().clean(value)
        if not text:
            return ""
        if not text.startswith("/"):
            raise ValidationError("must be an absolute path starting with /")
        bad = forbidden_character(text)
        if bad is not None:
            raise ValidationError(forbidden_character_message(bad))
        if "/../" in f"{text}/" or text.endswith("/.."):
            raise ValidationError("must not contain ..")
        if self.suffixes and not text.endswith(self.suffixes):
            raise ValidationError(
                "must end with %(suffixes)s", params={"suffixes": " or ".join(self.suffixes)}
            )
        return text


# --- Masks ---------------------------------------------------------------------------------------

MASK_PARTS = ("bank", "tube", "pixel")


def parse_mask(text: str, limits: Mapping[str, int]) -> list[dict[str, str]]:
    """Parse the mask text of the form into rows.

    Grammar (one mask row per line, blank lines and ``#`` comments ignored)::

        row   := part ((";" | whitespace) part)*
        part  := ("Bank" | "Tube" | "Pixel") "=" ranges       (names case-insensitive)
        ranges:= "1,3-5"-style integer ranges within 1..limits[part]

    ``Bank=36-50`` masks whole banks; ``Bank=1-50; Pixel=1-8,121-128`` masks the first and last
    eight pixels of every tube in every bank. A row names each part at most once and at least one
    part. Returns ``[{"bank": "36-50"}, {"bank": "1-50", "pixel": "1-8,121-128"}]`` with parts in
    bank, tube, pixel order and canonical ranges, so equal masks compare equal.
    """
    rows: list[dict[str, str]] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        row: dict[str, str] = {}
        for chunk in re.split(r"[;\s]+(?=[A-Za-z])", line):
            chunk = chunk.strip().rstrip(";").strip()
            name, sep, ranges = chunk.partition("=")
            part = name.strip().lower()
            if not sep or part not in MASK_PARTS:
                raise ValidationError(
                    "line %(line)s: %(chunk)r is not Bank=…, Tube=… or Pixel=…",
                    params={"line": number, "chunk": chunk},
                )
            if part in row:
                raise ValidationError(
                    "line %(line)s: %(part)s given twice", params={"line": number, "part": name}
                )
            try:
                parsed = parse_int_ranges(ranges.replace(" ", ""), minimum=1, maximum=limits[part])
            except ValidationError as exc:
                raise ValidationError(
                    "line %(line)s, %(part)s: %(error)s",
                    params={"line": number, "part": name.strip(), "error": exc.messages[0]},
                ) from None
            row[part] = format_int_ranges(parsed)
        rows.append({part: row[part] for part in MASK_PARTS if part in row})
    return rows


def format_mask(rows: Iterable[Mapping[str, str]]) -> str:
    """Inverse of parse_mask: one ``Bank=…; Tube=…; Pixel=…`` line per row."""
    return "\n".join(
        "; ".join(f"{part.capitalize()}={row[part]}" for part in MASK_PARTS if row.get(part))
        for row in rows
    )


class MaskField(forms.CharField):
    """Detector mask rows (see parse_mask) → ``list[{"bank"?, "tube"?, "pixel"?: ranges}]``."""

    widget = forms.Textarea(attrs={"rows": 4, "spellcheck": "false"})

    def __init__(self, *, banks: int, tubes: int, pixels: int, **kwargs: Any) -> None:
        self.limits = {"bank": banks, "tube": tubes, "pixel": pixels}
        kwargs.setdefault("required", False)
        kwargs.setdefault("max_length", MASK_MAX_LENGTH)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        rows: list[dict[str, str]] = []
        for row in value:
            # Rows from an import file or the database: only bank/tube/pixel, as "1-3" or 7.
            ok = isinstance(row, Mapping) and row and set(row) <= set(MASK_PARTS)
            if not ok or not all(
                isinstance(v, str | int) and not isinstance(v, bool) for v in row.values()
            ):
                raise ValidationError(
                    "mask rows must be objects like {'bank': '36-50', 'pixel': '1-8'}, got %(row)r",
                    params={"row": row},
                )
            rows.append({part: str(v) for part, v in row.items()})
        return format_mask(rows)

    def clean(self, value: Any) -> list[dict[str, str]]:
        text = super().clean(self.prepare_value(value))
        return parse_mask(text or "", self.limits)


# --- The base form -------------------------------------------------------------------------------

_NUMBER_FIELDS = (forms.FloatField, forms.IntegerField, forms.DecimalField)
_LIST_FIELDS = (FloatListField, NameListField, MaskField, forms.MultipleChoiceField)


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "text",
        bool: "true/false",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def has_unstorable_text(value: Any) -> bool:
    """Whether a JSON value holds text no database can store: NUL or a lone surrogate (which JSON
    allows as ``"\\ud800"`` and PostgreSQL's jsonb refuses)."""
    if isinstance(value, str):
        return "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, list):
        return any(has_unstorable_text(v) for v in value)
    if isinstance(value, Mapping):
        return any(has_unstorable_text(k) or has_unstorable_text(v) for k, v in value.items())
    return False


def check_json_type(field: forms.Field, value: Any) -> str | None:
    """Why ``value`` (a JSON value from the database, an import file or the command line) cannot
    be given to ``field``, or None. Text is accepted for every non-boolean field because that is
    what a browser or ``set KEY=VALUE`` sends; the field then parses it."""
    if isinstance(field, forms.BooleanField):
        return None if isinstance(value, bool) else f"expected true/false, got {_type_name(value)}"
    if isinstance(value, str):
        return None
    if isinstance(field, _NUMBER_FIELDS):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {_type_name(value)}"
    if isinstance(field, _LIST_FIELDS):
        return None if isinstance(value, list) else f"expected a list, got {_type_name(value)}"
    return f"expected text, got {_type_name(value)}"


class ReductionForm(forms.Form):
    """Base of every instrument form. Subclasses declare fields (name = template key, ``initial``
    = default, ``help_text`` with units) and may add cross-field rules in ``clean()``."""

    # Fields shown together under a heading on the page, in order: (heading, [field names]).
    # Fields not listed go under "Other".
    sections: ClassVar[list[tuple[str, list[str]]]] = []

    @classmethod
    def parameter_names(cls) -> list[str]:
        return list(cls.base_fields)

    @classmethod
    def initial_values(cls) -> dict[str, Any]:
        return {name: field.initial for name, field in cls.base_fields.items()}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ReductionForm:
        """Bind a complete JSON value set (e.g. from the database or an import file) to the form.

        Unknown keys, missing keys and values of the wrong JSON type become errors on the bound
        form (naming the key), next to whatever the fields and ``clean()`` find.
        """
        data: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for name, field in cls.base_fields.items():
            if name not in values:
                problems[name] = "missing: every parameter of the instrument must be given"
                continue
            value = values[name]
            if has_unstorable_text(value):
                problems[name] = "contains a NUL character or invalid Unicode"
                continue
            problem = check_json_type(field, value)
            if problem:
                problems[name] = problem
                continue
            if isinstance(field, forms.BooleanField):
                if value:
                    data[name] = "on"
            elif isinstance(field, forms.MultipleChoiceField):
                data[name] = [value] if isinstance(value, str) else value
            else:
                try:
                    prepared = field.prepare_value(value)
                except ValidationError as exc:
                    problems[name] = exc.messages[0]
                    continue
                data[name] = prepared if isinstance(prepared, str) else repr(prepared)
        form = cls(data=data)
        form._binding_problems = problems
        form._unknown_keys = sorted(set(values) - set(cls.base_fields))
        return form

    _binding_problems: dict[str, str]
    _unknown_keys: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._binding_problems = {}
        self._unknown_keys = []

    def _character_problems(self) -> dict[str, str]:
        """Fields whose submitted text holds a refused character (see forbidden_character):
        checked here, on the raw text, because the fields strip surrounding blanks (U+2028 and
        U+0085 among them) and Django's number fields would accept what remains. Text areas
        may hold line breaks."""
        problems: dict[str, str] = {}
        for name, field in self.fields.items():
            raw = field.widget.value_from_datadict(self.data, self.files, self.add_prefix(name))
            texts = raw if isinstance(raw, list) else [raw]
            multiline = isinstance(field.widget, forms.Textarea)
            for text in texts:
                bad = (
                    forbidden_character(text, multiline=multiline)
                    if isinstance(text, str)
                    else None
                )
                if bad is not None:
                    problems[name] = forbidden_character_message(bad)
                    break
        return problems

    def full_clean(self) -> None:
        problems = self._character_problems() if self.is_bound else {}
        if problems:
            # Clean without the refused values, so that neither the fields nor the cross-field
            # rules of clean() act on them; the page still shows what was submitted.
            submitted: Any = self.data  # a QueryDict from a request, a dict from from_values
            data = submitted.copy()
            for name in problems:
                data.pop(self.add_prefix(name), None)
            self.data = data
            try:
                super().full_clean()
            finally:
                self.data = submitted
        else:
            super().full_clean()
        if not self.is_bound:
            return
        for name, problem in (problems | self._binding_problems).items():
            # The field parsed an empty value in place of the rejected one; its message would
            # only confuse, so the binding problem replaces it.
            self.errors.pop(name, None)
            self.add_error(name, problem)
        for key in self._unknown_keys:
            self.add_error(None, f"{key}: unknown parameter")

    def cleaned_values(self) -> dict[str, Any]:
        """The validated parameter values as JSON, in field order (call after is_valid())."""
        return {name: self.cleaned_data[name] for name in self.base_fields}

    def sectioned_fields(self) -> list[tuple[str, list[forms.BoundField]]]:
        listed: set[str] = set()
        result: list[tuple[str, list[forms.BoundField]]] = []
        for heading, names in self.sections:
            result.append((heading, [self[name] for name in names]))
            listed.update(names)
        rest = [self[name] for name in self.fields if name not in listed]
        if rest:
            result.append(("Other", rest))
        return result

    def require_less(self, low: str, high: str, message: str) -> None:
        """Cross-field rule: ``cleaned_data[low] < cleaned_data[high]`` when both are valid."""
        a, b = self.cleaned_data.get(low), self.cleaned_data.get(high)
        if a is not None and b is not None and not a < b:
            self.add_error(high, message)


def errors_as_dict(form: forms.Form) -> dict[str, list[str]]:
    """``{"field": [messages]}`` with non-field errors under ``"__all__"``."""
    return {name: [str(m) for m in messages] for name, messages in form.errors.items()}
