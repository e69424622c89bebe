"""Reduction runs (ExecutedReductionStep): what a run takes from the reduction configuration."""

from __future__ import annotations

from pathlib import Path

from pipelines.models import ExecutedReductionStep
from reduction.errors import ReductionConfigError
from reduction.instruments import get_instrument
from reduction.models import ParameterSet
from reduction.services import (
    parameter_set_script_write,
    reduction_config_current,
    reduction_config_update,
)


def reduction_script_for_run(run: ExecutedReductionStep, config_dir: Path) -> ParameterSet:
    """Pin the parameter set a run uses and put its script in the run's config directory.

    The run keeps the version it was first given (a retry runs the same script); a new run gets
    the instrument's latest version, created from the current values if the instrument has never
    been saved. The script is written byte for byte as stored with the version (atomically, as
    ``reduce_<KEY>.py``) after checking its checksum. Raises ReductionConfigError when the step
    names no instrument or the stored script does not match its checksum.
    """
    key = run.reduction_step.reduction_instrument
    if not key:
        raise ReductionConfigError(f"{run.reduction_step} does not name a reduction instrument")
    # An unknown instrument (UnknownInstrument) is refused before any version is pinned.
    get_instrument(key)
    parameter_set = run.parameter_set
    if parameter_set is None:
        parameter_set = ParameterSet.objects.latest_for(key)
        if parameter_set is None:
            parameter_set = reduction_config_update(
                key,
                values=reduction_config_current(key),
                user=None,
                comment=f"first version, created for run {run.pk}",
            ).parameter_set
        # Conditional: if another worker pinned a version first, use that one.
        pinned = ExecutedReductionStep.objects.filter(pk=run.pk, parameter_set__isnull=True).update(
            parameter_set=parameter_set
        )
        if not pinned:
            run.refresh_from_db(fields=["parameter_set"])
            assert run.parameter_set is not None
            parameter_set = run.parameter_set
        run.parameter_set = parameter_set
    parameter_set_script_write(parameter_set, config_dir)
    return parameter_set
