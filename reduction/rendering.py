"""The single sandboxed Jinja environment that turns parameter values into reduction scripts.

Rules every template can rely on (and CONTRIBUTING.md, "Adding an instrument" repeats):

- Every ``{{ expression }}`` is written as a Python literal (``repr`` of strings, numbers,
  booleans, None, and lists/dicts of those). A value can therefore never inject code, however it
  is quoted in the template. Use ``{{ }}`` only where a Python expression may stand (right of
  ``=``, in a call) — never inside a string or docstring.
- An undefined name is an error (StrictUndefined), not a blank: a template asking for a key the
  form does not define fails to render with the key's name.
- The sandbox refuses attribute access to Python internals (``__class__``, ``__globals__``, ...)
  and the environment has no loader, so a template can neither reach the interpreter nor read
  other files.
- The output must compile as Python; ``render_script`` checks that before anyone writes it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from reduction.errors import ReductionConfigError


class ScriptRenderError(ReductionConfigError):
    """The template could not be rendered, or rendered something that is not Python."""

    def __init__(self, template_name: str, message: str, lineno: int | None = None) -> None:
        self.template_name = template_name
        self.lineno = lineno
        self.message = message
        where = f"{template_name}, line {lineno}" if lineno else template_name
        super().__init__(f"{where}: {message}")


def python_literal(value: Any) -> str:
    """Python source for a JSON value; raises TypeError for anything else (and for inf/nan,
    which have no literal)."""
    if value is None or isinstance(value, bool | int | str):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{value!r} has no Python literal")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{python_literal(k)}: {python_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be written into a script")


def _finalize(value: Any) -> str:
    if isinstance(value, Undefined):
        # Make StrictUndefined (or the sandbox's unsafe-attribute marker) raise its own error,
        # which names the missing key or the refused attribute.
        str(value)
    return python_literal(value)


# One environment for the whole process: sandboxed and immutable (templates cannot mutate the
# lists and dicts they are given), strict about undefined names, no autoescaping (the output is
# Python, not HTML), keeping the template's final newline.
ENVIRONMENT = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    finalize=_finalize,
    trim_blocks=True,
    lstrip_blocks=True,
)


def checksum(text: str) -> str:
    """sha256 of the script as written (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_source(source: str, context: Mapping[str, Any], *, template_name: str) -> str:
    """Render template ``source`` with ``context`` and check that the result compiles.

    Raises ScriptRenderError naming the template, the line where known, and the cause: syntax
    error, undefined name, sandbox violation, a value with no literal, or invalid Python output.
    """
    try:
        template = ENVIRONMENT.from_string(source)
        script = template.render(dict(context))
    except TemplateSyntaxError as exc:
        raise ScriptRenderError(
            template_name, f"template syntax error: {exc.message}", exc.lineno
        ) from None
    except SecurityError as exc:
        raise ScriptRenderError(template_name, f"refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        # UndefinedError and friends: the message names the missing key.
        raise ScriptRenderError(template_name, f"{type(exc).__name__}: {exc}") from None
    except TypeError as exc:
        raise ScriptRenderError(template_name, str(exc)) from None
    try:
        compile(script, template_name.removesuffix(".j2"), "exec")
    except SyntaxError as exc:
        raise ScriptRenderError(
            template_name, f"rendered script is not valid Python: {exc.msg}", exc.lineno
        ) from None
    return script


def script_context(
    values: Mapping[str, Any], *, instrument_key: str, label: str, version: int | None
) -> dict[str, Any]:
    """What a template sees: every parameter by name, plus ``parameter_set`` (instrument key,
    label and version number; version None in a preview of unsaved values)."""
    if "parameter_set" in values:
        raise ScriptRenderError(instrument_key, "'parameter_set' is reserved and cannot be a key")
    return {
        **values,
        "parameter_set": {"instrument": instrument_key, "label": label, "version": version},
    }
