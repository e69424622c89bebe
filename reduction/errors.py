"""Errors the configuration pages, the command and the workflow show to people. Each message
names the instrument and, where there is one, the parameter key or template line."""

from __future__ import annotations


class ReductionConfigError(Exception):
    """Base: nothing was changed (database and script file are as they were)."""


class InvalidParameters(ReductionConfigError):
    def __init__(self, instrument: str, errors: dict[str, list[str]]) -> None:
        self.instrument = instrument
        self.errors = errors
        details = "; ".join(
            f"{key}: {' '.join(messages)}" if key != "__all__" else " ".join(messages)
            for key, messages in errors.items()
        )
        super().__init__(f"{instrument}: invalid parameters: {details}")


class ScriptWriteError(ReductionConfigError):
    pass
