"""Staleness from provenance (issue 12 item 3): a product is stale when its step's software
version (by policy) or its instrument's parameter set changed after it was made, or when an
upstream product it consumed is stale; ``why`` and the admin say why."""

from __future__ import annotations

import pytest

from pipelines.models import DataProduct
from pipelines.services.products import (
    products_refresh_staleness,
    products_supersede,
    stale_run_reasons,
)
from pipelines.services.why import explain, resolve
from tests.factories import ParameterSetFactory, ReductionSoftwareVersionFactory

from .campaign_helpers import made_run, scan_package, two_step_pipeline

pytestmark = pytest.mark.django_db


def _world():
    _pipeline, calibrate, combine = two_step_pipeline()
    a, b = scan_package(1), scan_package(2)
    run_a, [prod_a] = made_run(calibrate, "a", [a])
    run_b, [prod_b] = made_run(calibrate, "b", [b])
    run_c, [prod_c] = made_run(combine, "all", [a, b], consumed=[prod_a, prod_b])
    return calibrate, combine, (run_a, prod_a), (run_b, prod_b), (run_c, prod_c)


def test_products_made_with_the_version_their_step_resolves_to_are_current() -> None:
    _world()
    report = products_refresh_staleness()
    assert report.as_dict() == {"stale_runs": 0, "marked": 0, "cleared": 0}
    assert not DataProduct.objects.filter(stale_since__isnull=False).exists()


def test_a_new_compatible_release_makes_old_products_stale_and_their_consumers_too() -> None:
    calibrate, _combine, (_run_a, prod_a), (_run_b, prod_b), (_run_c, prod_c) = _world()
    ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    report = products_refresh_staleness()
    assert report.stale_runs == 3 and report.marked == 3
    for product in (prod_a, prod_b, prod_c):
        product.refresh_from_db()
        assert product.stale_since is not None
    assert f"made with {calibrate.software.name} 1.0.0" in prod_a.stale_reason
    assert "now uses 1.1.0" in prod_a.stale_reason
    # Propagated along lineage, naming the stale upstream run and the root cause.
    assert prod_c.stale_reason.startswith("consumed stale products of run ")
    assert "(step calibrate)" in prod_c.stale_reason and "1.1.0" in prod_c.stale_reason


def test_a_new_major_release_leaves_a_compatible_step_current() -> None:
    calibrate, *_ = _world()
    ReductionSoftwareVersionFactory(software=calibrate.software, version="2.0.0")
    assert products_refresh_staleness().marked == 0


def test_staleness_propagates_over_several_steps() -> None:
    calibrate, combine, _a, _b, (run_c, prod_c) = _world()
    later = type(combine).objects.create(
        pipeline=combine.pipeline,
        name="publish",
        step_order=3,
        software=combine.software,
        software_version=combine.software_version,
        group_by=[],
    )
    run_d, [prod_d] = made_run(later, "all", [], consumed=[prod_c])
    ReductionSoftwareVersionFactory(software=calibrate.software, version="1.2.0")
    reasons = stale_run_reasons()
    assert reasons[run_d.pk].startswith(f"consumed stale products of run {run_c.pk} (step combine)")
    products_refresh_staleness()
    prod_d.refresh_from_db()
    assert prod_d.stale_since is not None


def test_a_newer_parameter_set_of_the_instrument_makes_its_products_stale() -> None:
    _calibrate, _combine, (run_a, prod_a), _b, _c = _world()
    old = ParameterSetFactory(instrument="cncs", number=1)
    type(run_a).objects.filter(pk=run_a.pk).update(parameter_set=old)
    ParameterSetFactory(instrument="cncs", number=2)
    products_refresh_staleness()
    prod_a.refresh_from_db()
    assert "cncs reduction parameters v1; v2 is current" in prod_a.stale_reason


def test_a_product_is_current_again_when_the_new_version_is_switched_off() -> None:
    calibrate, _combine, (_run_a, prod_a), _b, _c = _world()
    new = ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    products_refresh_staleness()
    new.is_active = False
    new.save()
    report = products_refresh_staleness()
    assert report.cleared == 3
    prod_a.refresh_from_db()
    assert prod_a.stale_since is None and prod_a.stale_reason == ""


def test_marks_keep_their_first_date_when_refreshed_again() -> None:
    calibrate, _combine, (_run_a, prod_a), _b, _c = _world()
    ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    products_refresh_staleness()
    prod_a.refresh_from_db()
    first = prod_a.stale_since
    assert products_refresh_staleness().marked == 0
    prod_a.refresh_from_db()
    assert prod_a.stale_since == first


def test_superseded_products_are_history_and_are_not_rejudged() -> None:
    calibrate, _combine, (run_a, prod_a), _b, _c = _world()
    ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    products_refresh_staleness()
    new_run, [new_product] = made_run(calibrate, "a", [run_a.input_raw_packages.get()])
    type(new_run).objects.filter(pk=new_run.pk).update(replaces=run_a)
    new_run.refresh_from_db()
    assert products_supersede(new_run) == 1
    assert products_supersede(new_run) == 0  # once
    prod_a.refresh_from_db()
    assert prod_a.superseded_by == new_product and prod_a.stale_since is not None
    # The new run used the software the step resolves to now? It used 1.0.0 (made_run), so it
    # is stale itself; the superseded one keeps its marks whatever happens.
    reason = prod_a.stale_reason
    products_refresh_staleness()
    prod_a.refresh_from_db()
    assert prod_a.stale_reason == reason


def test_why_says_why_a_product_and_its_run_are_stale() -> None:
    calibrate, _combine, (run_a, prod_a), _b, _c = _world()
    ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    products_refresh_staleness()
    product, _ = resolve(f"product:{prod_a.pk}")
    assert "stale since" in explain(product).sentence
    assert "now uses 1.1.0" in explain(product).sentence
    assert "its products are stale since" in explain(run_a).sentence


def test_saving_a_new_version_refreshes_staleness_after_the_save_commits(
    django_capture_on_commit_callbacks,
) -> None:
    calibrate, _combine, (_run_a, prod_a), _b, (_run_c, prod_c) = _world()
    with django_capture_on_commit_callbacks(execute=True):
        ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    prod_a.refresh_from_db()
    prod_c.refresh_from_db()
    assert prod_a.stale_since is not None and prod_c.stale_since is not None


def test_re_pinning_a_step_to_the_version_its_products_were_made_with_makes_them_current(
    django_capture_on_commit_callbacks,
) -> None:
    calibrate, _combine, (_run_a, prod_a), _b, _c = _world()
    first = calibrate.software_version
    ReductionSoftwareVersionFactory(software=calibrate.software, version="1.1.0")
    products_refresh_staleness()
    with django_capture_on_commit_callbacks(execute=True):
        calibrate.version_policy = "pinned"
        calibrate.software_version = first
        calibrate.save()
    prod_a.refresh_from_db()
    assert prod_a.stale_since is None
