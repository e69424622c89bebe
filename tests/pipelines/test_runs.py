"""reduction_script_for_run: which parameter set a run pins, and the script it gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.models import ExecutedReductionStep
from pipelines.services.runs import reduction_script_for_run
from reduction.errors import ReductionConfigError
from reduction.instruments import UnknownInstrument, get_instrument
from reduction.services import reduction_config_current, reduction_config_update
from tests.factories import ExecutedReductionStepFactory, ReductionStepFactory

pytestmark = pytest.mark.django_db


def test_a_run_pins_the_latest_version_and_gets_its_script(tmp_path: Path) -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    run = ExecutedReductionStepFactory(
        reduction_step=ReductionStepFactory(reduction_instrument="cncs")
    )

    ps = reduction_script_for_run(run, tmp_path / "config")

    assert ps == v1.parameter_set
    run.refresh_from_db()
    assert run.parameter_set == ps
    assert (tmp_path / "config/reduce_CNCS.py").read_text() == ps.script_text

    # A retry after a parameter change still runs the version it was given.
    reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_max": 0.9}, user=None
    )
    assert reduction_script_for_run(run, tmp_path / "retry") == v1.parameter_set


def test_a_run_of_a_never_saved_instrument_creates_version_one(tmp_path: Path) -> None:
    run = ExecutedReductionStepFactory(
        reduction_step=ReductionStepFactory(reduction_instrument="chai")
    )
    ps = reduction_script_for_run(run, tmp_path)
    assert (ps.number, ps.values) == (1, get_instrument("chai").defaults())
    assert "first version, created for run" in ps.comment


def test_a_step_without_an_instrument_is_refused(tmp_path: Path) -> None:
    run = ExecutedReductionStepFactory()
    with pytest.raises(ReductionConfigError, match="does not name a reduction instrument"):
        reduction_script_for_run(run, tmp_path)


def test_an_unknown_instrument_is_refused_before_a_version_is_pinned(tmp_path: Path) -> None:
    # The model's validation refuses unknown keys; a row written around it still fails here.
    run = ExecutedReductionStepFactory(
        reduction_step=ReductionStepFactory(reduction_instrument="nosuch")
    )
    with pytest.raises(UnknownInstrument):
        reduction_script_for_run(run, tmp_path)
    assert ExecutedReductionStep.objects.get(pk=run.pk).parameter_set is None


def test_a_version_pinned_by_another_worker_first_is_the_one_used(tmp_path: Path) -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    run = ExecutedReductionStepFactory(
        reduction_step=ReductionStepFactory(reduction_instrument="cncs")
    )
    # Another worker pins v1; this worker's copy of the row still has none, and v2 is now latest.
    ExecutedReductionStep.objects.filter(pk=run.pk).update(parameter_set=v1.parameter_set)
    reduction_config_update(
        "cncs", values=reduction_config_current("cncs") | {"e_max": 0.9}, user=None
    )

    assert reduction_script_for_run(run, tmp_path) == v1.parameter_set
    assert run.parameter_set == v1.parameter_set
    assert (tmp_path / "reduce_CNCS.py").read_text() == v1.parameter_set.script_text


def test_a_stored_script_that_does_not_match_its_checksum_is_not_written(tmp_path: Path) -> None:
    v1 = reduction_config_update("cncs", values=reduction_config_current("cncs"), user=None)
    run = ExecutedReductionStepFactory(
        reduction_step=ReductionStepFactory(reduction_instrument="cncs"),
        parameter_set=v1.parameter_set,
    )
    assert run.parameter_set is not None
    run.parameter_set.script_text += "\nimport os; os.system('rm -rf /')\n"

    with pytest.raises(ReductionConfigError, match="does not match its checksum"):
        reduction_script_for_run(run, tmp_path)
    assert not (tmp_path / "reduce_CNCS.py").exists()
