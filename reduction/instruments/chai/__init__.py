"""CHAI, the heterodyne array of the demo observatory (LFA and HFA modules)."""

from pathlib import Path

from reduction.instruments.base import Instrument
from reduction.instruments.chai.forms import CHAIForm

INSTRUMENT = Instrument(
    key="chai",
    label="CHAI heterodyne array",
    form_class=CHAIForm,
    package_dir=Path(__file__).resolve().parent,
    description=(
        "Spectral-line array: system-temperature cut, spike flagging, polynomial baseline outside "
        "the line window, velocity rebinning and integrated line intensity per spectrum."
    ),
    output_dir_setting="REDUCTION_SCRIPT_DIR_CHAI",
    facility="demo observatory",
)
