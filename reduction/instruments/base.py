"""What the rest of the app needs to know about one instrument."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from reduction.forms import ReductionForm


@dataclass(frozen=True)
class Instrument:
    """One instrument's reduction configuration: its parameter form and its script template.

    The template is ``reduce_<KEY>.py.j2`` in the instrument's own folder (``package_dir``); the
    rendered script is ``reduce_<KEY>.py`` in ``output_dir()``.
    """

    key: str
    label: str
    form_class: type[ReductionForm]
    package_dir: Path
    description: str = ""
    # Name of a Django setting holding this instrument's script directory, for facilities whose
    # autoreducers read a fixed place (e.g. /SNS/CNCS/shared/autoreduce). Unset or empty setting:
    # settings.REDUCTION_SCRIPT_DIR / key.
    output_dir_setting: str = ""
    facility: str = field(default="")

    @property
    def template_name(self) -> str:
        return f"reduce_{self.key.upper()}.py.j2"

    @property
    def template_path(self) -> Path:
        return self.package_dir / self.template_name

    @property
    def script_name(self) -> str:
        return f"reduce_{self.key.upper()}.py"

    def template_source(self) -> str:
        return self.template_path.read_text(encoding="utf-8")

    def output_dir(self) -> Path:
        override = getattr(settings, self.output_dir_setting, "") if self.output_dir_setting else ""
        if override:
            return Path(override)
        return Path(settings.REDUCTION_SCRIPT_DIR) / self.key

    def script_path(self) -> Path:
        return self.output_dir() / self.script_name

    def defaults(self) -> dict[str, Any]:
        """The default parameter values, as validated JSON (the form's ``initial`` values)."""
        form = self.form_class.from_values(self.form_class.initial_values())
        if not form.is_valid():
            raise RuntimeError(f"{self.key}: the form's defaults do not validate: {form.errors}")
        return form.cleaned_values()
