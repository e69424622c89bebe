"""Operator entry point for instrument reduction parameters (show, set, render, export, import).

Writes go through the same service as the web form: validated, audited, versioned, and the
instrument's script re-installed.
"""

from __future__ import annotations

import json
import math
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from reduction.errors import ReductionConfigError
from reduction.instruments import INSTRUMENTS, get_instrument
from reduction.models import ParameterSet, ParameterSetAction
from reduction.services import (
    ConfigWriteResult,
    reduction_config_current,
    reduction_config_render,
    reduction_config_update,
)


def _json_number(text: str) -> Any:
    """A JSON number as a float, or as its text when a float cannot hold it (``1e999``, which
    would become inf): the field then says that the number typed is out of range."""
    number = float(text)
    return number if math.isfinite(number) else text


def _parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CommandError(f"{text!r}: expected KEY=VALUE")
    try:
        value = json.loads(raw, parse_float=_json_number)  # numbers, true/false, lists, objects
    except (ValueError, RecursionError):
        # Not JSON (JSONDecodeError), or JSON Python will not load (an integer of more than 4300
        # digits, nesting deeper than the recursion limit): plain text, which the field parses
        # and, if it is not valid there either, rejects by name.
        value = raw  # plain text: paths, "1,3-5", masks
    return key.strip(), value


class Command(BaseCommand):
    help = (
        "Show, change, render, export or import an instrument's reduction parameters. "
        "Instruments: " + ", ".join(INSTRUMENTS)
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        instrument_help = f"instrument key, one of: {', '.join(INSTRUMENTS)}"
        version_help = (
            "saved version number (listed on the history page); default: the current values"
        )
        show = sub.add_parser(
            "show", help="current values (or those of --version N)", description="Print the values."
        )
        show.add_argument("instrument", help=instrument_help)
        show.add_argument("--version", type=int, metavar="N", help=version_help)
        set_ = sub.add_parser(
            "set",
            help="change KEY=VALUE (VALUE as JSON, else text)",
            description="Change some values and save them as a new version.",
        )
        set_.add_argument("instrument", help=instrument_help)
        set_.add_argument(
            "assignments",
            nargs="+",
            metavar="KEY=VALUE",
            help="VALUE is read as JSON (numbers, true/false, lists), else as text (paths, masks)",
        )
        render = sub.add_parser(
            "render",
            help="print the script of the current or a version",
            description="Print the stored script of a version (default: the latest saved).",
        )
        render.add_argument("instrument", help=instrument_help)
        render.add_argument(
            "--version", type=int, metavar="N", help="version number; default: the latest saved"
        )
        export = sub.add_parser(
            "export", help="write the values as JSON", description="Write the values as JSON."
        )
        export.add_argument("instrument", help=instrument_help)
        export.add_argument("--version", type=int, metavar="N", help=version_help)
        export.add_argument("--output", type=Path, help="file (default: stdout)")
        import_ = sub.add_parser(
            "import",
            help="save the values of a JSON export",
            description="Save the values of a JSON export as a new version.",
        )
        import_.add_argument("instrument", help=instrument_help)
        import_.add_argument("file", type=Path, help="a file written by 'export'")
        for writer, default_comment in (
            (set_, "manage.py reduction_config set"),
            (import_, "imported from FILE"),
        ):
            writer.add_argument("--user", help="username recorded as the author (default: none)")
            writer.add_argument(
                "--comment",
                default="",
                help=f"why, kept with the new version (default: '{default_comment}')",
            )

    def handle(self, *args: Any, **options: Any) -> None:
        key = options["instrument"]
        try:
            get_instrument(key)
            getattr(self, f"_{options['action']}")(key, options)
        except ReductionConfigError as exc:
            raise CommandError(str(exc)) from exc

    def _version(self, key: str, number: int | None) -> ParameterSet | None:
        if number is None:
            return None
        try:
            return ParameterSet.objects.get(instrument=key, number=number)
        except ParameterSet.DoesNotExist:
            raise CommandError(f"{key} has no version {number}") from None

    def _values(self, key: str, number: int | None) -> dict[str, Any]:
        ps = self._version(key, number)
        return dict(ps.values) if ps else reduction_config_current(key)

    def _user(self, username: str | None) -> Any:
        if not username:
            return None
        try:
            return get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {username!r}") from None

    def _report(self, result: ConfigWriteResult) -> None:
        ps = result.parameter_set
        if result.created:
            changed = ", ".join(result.changed_keys) or (
                "none from the defaults" if ps.number == 1 else "script only"
            )
            self.stdout.write(f"{ps}: saved (changed: {changed})")
        else:
            self.stdout.write(f"{ps}: no changes")
        self.stdout.write(f"wrote {result.path} sha256 {result.checksum}")

    def _show(self, key: str, options: dict[str, Any]) -> None:
        values = self._values(key, options["version"])
        latest = ParameterSet.objects.latest_for(key)
        label = f"v{options['version']}" if options["version"] else "current"
        self.stdout.write(
            f"{key} ({label}; latest saved: {f'v{latest.number}' if latest else 'none'})"
        )
        width = max(len(k) for k in values)
        for name, value in values.items():
            self.stdout.write(f"  {name:<{width}}  {json.dumps(value)}")

    def _set(self, key: str, options: dict[str, Any]) -> None:
        changes = dict(_parse_assignment(a) for a in options["assignments"])
        values = reduction_config_current(key)
        unknown = sorted(set(changes) - set(values))
        if unknown:
            raise CommandError(f"{key}: unknown parameter(s): {', '.join(unknown)}")
        result = reduction_config_update(
            key,
            values=values | changes,
            user=self._user(options["user"]),
            comment=options["comment"] or "manage.py reduction_config set",
        )
        self._report(result)

    def _render(self, key: str, options: dict[str, Any]) -> None:
        ps = self._version(key, options["version"]) or ParameterSet.objects.latest_for(key)
        if ps is not None:
            # The stored script, byte for byte: what the version installed and runs use.
            self.stdout.write(ps.script_text, ending="")
        else:
            script = reduction_config_render(key, reduction_config_current(key))
            self.stdout.write(script, ending="")

    def _export(self, key: str, options: dict[str, Any]) -> None:
        ps = self._version(key, options["version"]) or ParameterSet.objects.latest_for(key)
        document = {
            "instrument": key,
            "version": ps.number if ps else None,
            "values": self._values(key, options["version"]),
        }
        text = json.dumps(document, indent=2) + "\n"
        if options["output"]:
            try:
                options["output"].write_text(text, encoding="utf-8")
            except OSError as exc:
                raise CommandError(
                    f"cannot write {options['output']}: {exc.strerror or exc}"
                ) from exc
            self.stdout.write(f"exported {key} to {options['output']}")
        else:
            self.stdout.write(text, ending="")

    def _import(self, key: str, options: dict[str, Any]) -> None:
        try:
            document = json.loads(
                options["file"].read_text(encoding="utf-8"), parse_float=_json_number
            )
        except OSError as exc:
            raise CommandError(f"cannot read {options['file']}: {exc.strerror or exc}") from exc
        except (ValueError, RecursionError) as exc:
            # JSONDecodeError, UnicodeDecodeError, an integer over Python's 4300-digit limit,
            # nesting deeper than the recursion limit.
            message = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise CommandError(f"{options['file']} is not a JSON export: {message}") from exc
        if not isinstance(document, dict) or not isinstance(document.get("values"), dict):
            raise CommandError(f'{options["file"]}: expected {{"values": {{...}}}}')
        if document.get("instrument", key) != key:
            raise CommandError(
                f"{options['file']} holds {document['instrument']!r} values, not {key!r}"
            )
        result = reduction_config_update(
            key,
            values=document["values"],
            user=self._user(options["user"]),
            comment=options["comment"] or f"imported from {options['file'].name}",
            action=ParameterSetAction.IMPORT,
        )
        self._report(result)
