"""CNCS-style direct-geometry neutron spectrometer (SNS seed 004)."""

from pathlib import Path

from reduction.instruments.base import Instrument
from reduction.instruments.cncs.forms import CNCSForm

INSTRUMENT = Instrument(
    key="cncs",
    label="CNCS cold neutron chopper spectrometer",
    form_class=CNCSForm,
    package_dir=Path(__file__).resolve().parent,
    description=(
        "Direct-geometry spectrometer: detector masks, vanadium normalisation, detector grouping "
        "and energy-transfer binning as fractions of the incident energy."
    ),
    output_dir_setting="REDUCTION_SCRIPT_DIR_CNCS",
    facility="SNS",
)
