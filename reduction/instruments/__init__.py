"""The instrument registry: key → (label, dotted path of its Instrument object).

Adding an instrument is one line here plus a folder next to this file (see
CONTRIBUTING.md, "Adding an instrument"). The key is what ReductionProperty/ParameterSet rows,
the URL ``/reduction/<key>/``, the ``scientists_<key>`` group and
ReductionStep.reduction_instrument use; never rename one that has rows.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING

from reduction.errors import ReductionConfigError

if TYPE_CHECKING:
    from reduction.instruments.base import Instrument

INSTRUMENTS: dict[str, tuple[str, str]] = {
    "chai": ("CHAI heterodyne array", "reduction.instruments.chai.INSTRUMENT"),
    "primecam": ("Prime-Cam continuum camera", "reduction.instruments.primecam.INSTRUMENT"),
    "cncs": ("CNCS cold neutron chopper spectrometer", "reduction.instruments.cncs.INSTRUMENT"),
}


class UnknownInstrument(ReductionConfigError, LookupError):
    def __init__(self, key: str) -> None:
        self.key = key
        known = ", ".join(sorted(INSTRUMENTS))
        super().__init__(f"unknown reduction instrument {key!r}; known: {known}")


@cache
def get_instrument(key: str) -> Instrument:
    """The Instrument registered under ``key``, imported on first use."""
    try:
        _label, dotted = INSTRUMENTS[key]
    except KeyError:
        raise UnknownInstrument(key) from None
    module_path, _, attribute = dotted.rpartition(".")
    instrument: Instrument = getattr(import_module(module_path), attribute)
    if instrument.key != key:
        raise RuntimeError(f"registry key {key!r} points at instrument {instrument.key!r}")
    return instrument


def all_instruments() -> list[Instrument]:
    return [get_instrument(key) for key in INSTRUMENTS]
