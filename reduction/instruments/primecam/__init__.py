"""Prime-Cam, the continuum camera of the demo observatory (280 GHz and 350 GHz modules)."""

from pathlib import Path

from reduction.instruments.base import Instrument
from reduction.instruments.primecam.forms import PrimeCamForm

INSTRUMENT = Instrument(
    key="primecam",
    label="Prime-Cam continuum camera",
    form_class=PrimeCamForm,
    package_dir=Path(__file__).resolve().parent,
    description=(
        "Time-stream mapping: detector flags, common-mode removal, high-pass filter, despiking "
        "and binning onto a map per module."
    ),
    output_dir_setting="REDUCTION_SCRIPT_DIR_PRIMECAM",
    facility="demo observatory",
)
