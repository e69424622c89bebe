"""The one-way dependency rule of ARCHITECTURE.md: ``pipelines`` (the workflow) uses ``reduction``
(the configuration), and ``reduction`` imports nothing from ``pipelines``; ``access`` (shared by
both) imports neither. Checked on the syntax tree of every module, so that neither a lazy import
inside a function nor one under ``if TYPE_CHECKING`` slips through, and a comment or docstring
that mentions pipelines is not an offence."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Calls whose first argument, a literal, names a module or an app/model: a dependency as real as
# an import statement.
_DYNAMIC = {"import_module", "import_string", "__import__", "get_model", "get_app_config"}


def _absolute(module: str, package: str | None, level: int) -> str:
    """The absolute module of an import (``from ..x import y`` inside ``package``)."""
    if not level or package is None:
        return module
    base = package.split(".")
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, module] if module else base)


def _refers_to(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(f"{forbidden}.")


def forbidden_references(source: str, forbidden: str, *, package: str | None = None) -> list[str]:
    """Every import of ``forbidden`` (or of a module under it) in ``source``, and every call of
    ``importlib.import_module``, ``import_string``, ``__import__``, ``apps.get_model`` or
    ``apps.get_app_config`` with a literal naming it, as "line N: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if _refers_to(a.name, forbidden)
            ]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module or "", package, node.level)
            targets = [module] if module else []
            # ``from . import pipelines`` at the top level, or ``from x import pipelines``.
            targets += [f"{module}.{a.name}" if module else a.name for a in node.names]
            if any(_refers_to(t, forbidden) for t in targets):
                names = ", ".join(a.name for a in node.names)
                written = "." * node.level + (node.module or "")
                found.append(f"line {node.lineno}: from {written} import {names}")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if (
                called in _DYNAMIC
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and _refers_to(first.value, forbidden)
            ):
                found.append(f"line {node.lineno}: {called}({first.value!r})")
    return found


def _modules(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts)


def _offences(top: str, forbidden: str) -> list[str]:
    offences = []
    for path in _modules(top):
        relative = path.relative_to(ROOT)
        package = ".".join(relative.parent.parts)
        found = forbidden_references(path.read_text(), forbidden, package=package)
        offences += [f"{relative}: {f}" for f in found]
    return offences


@pytest.mark.parametrize(
    ("top", "forbidden"),
    [("reduction", "pipelines"), ("access", "pipelines"), ("access", "reduction")],
)
def test_the_dependency_rule_holds(top: str, forbidden: str) -> None:
    modules = _modules(top)
    assert ROOT / top / "__init__.py" in modules, f"no {top} package under {ROOT}"
    assert _offences(top, forbidden) == [], (
        f"{top} must import nothing from {forbidden} (ARCHITECTURE.md, Layout)"
    )


def test_the_walk_sees_every_reduction_module() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _modules("reduction")}
    assert {
        "reduction/services.py",
        "reduction/views.py",
        "reduction/signals.py",
        "reduction/instruments/__init__.py",
        "reduction/management/commands/reduction_config.py",
    } <= names


@pytest.mark.parametrize(
    "source",
    [
        "import pipelines",
        "import pipelines.models as m",
        "import os, pipelines.services.runs",
        "from pipelines import models",
        "from pipelines.models import DataProduct",
        "def f():\n    from pipelines.models import DataProduct\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.models import X\n",
        "import importlib\nimportlib.import_module('pipelines.services.products')",
        "from django.utils.module_loading import import_string\nimport_string('pipelines.x.y')",
        "__import__('pipelines')",
        "from django.apps import apps\napps.get_model('pipelines.DataProduct')",
        "from django.apps import apps\napps.get_model('pipelines', 'DataProduct')",
    ],
)
def test_it_catches_every_form_of_import(source: str) -> None:
    assert forbidden_references(source, "pipelines", package="reduction")


@pytest.mark.parametrize(
    "source",
    [
        '"""The pipelines admin does the same."""',
        "# from pipelines.models import DataProduct",
        "import pipelinesx",
        "from reduction.models import ParameterSet",
        "from . import services",
        "from .pipelines_helpers import x",
        "LABELS = ('pipelines', 'reduction')",
    ],
)
def test_it_leaves_other_code_alone(source: str) -> None:
    assert forbidden_references(source, "pipelines", package="reduction") == []
