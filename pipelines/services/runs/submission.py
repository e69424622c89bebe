"""The submission worker (``run_submit``, task ``submit_run`` on ``workflow.hpc``): the attempt's
directories, verified inputs and upstream products, the pinned reduction script, the
manifest, and the backend submission under the job name ``run-<id>-<attempt>``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.utils import timezone

from pipelines.exceptions import NonRetryableError
from pipelines.faults import pause_point
from pipelines.models import (
    DataLocation,
    DataProduct,
    DataProductType,
    ExecutedReductionStep,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataFile,
    ReductionSoftwareVersion,
    RunStatus,
)
from pipelines.storage.checksums import checksum_file, new_hasher
from pipelines.storage.paths import safe_join
from reduction.errors import ReductionConfigError
from reduction.instruments import get_instrument
from reduction.models import ParameterSet
from reduction.services import (
    parameter_set_script_write,
    reduction_config_current,
    reduction_config_update,
)

from ..operations import ClaimLost
from ..states import ForbiddenTransition, TransitionConflict, transition

if TYPE_CHECKING:
    from pipelines.containers import RunLayout


from .common import (
    _CLEAR_LEASE,
    DEFAULT_RESOURCES,
    CorruptInput,
    RunLeaseKeeper,
    job_name,
    run_stages_raw_data,
)

log = logging.getLogger(__name__)


# --- reduction script ----------------------------------------------------------------------------
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


# --- the submission worker -----------------------------------------------------------------------
@dataclass(frozen=True)
class StagedInput:
    """One raw file of the run's packages, linked into the attempt's input directory."""

    package_id: int
    package_name: str
    raw_file_id: str
    relative_path: str
    checksum: str
    checksum_algorithm: str
    size: int
    instrument: str
    module: str


def run_submit(run_id: int, *, token: str, owner: str) -> ExecutedReductionStep:
    """Prepare and submit one staged run held by ``token`` (module docstring, step 3). Returns
    the run, SUBMITTED. Raises ``ClaimLost`` when the claim no longer holds the run (nothing
    done), ``CorruptInput`` for an input that does not match its checksum (nothing submitted),
    and whatever preparing or submitting raised otherwise; the task fails the run then."""
    from pipelines.backends.base import JobSpec, get_backend
    from pipelines.containers import build_command, make_run_dirs, run_layout, write_manifest

    run = ExecutedReductionStep.objects.select_related(
        "reduction_step__pipeline__processing_location", "software_version__software"
    ).get(pk=run_id)
    if run.status != RunStatus.STAGING_DATA or not token or run.claim_token != token:
        raise ClaimLost(
            f"run {run_id} is {run.status} under claim {run.claim_token[:8] or '-'}, "
            f"not staging_data under {token[:8] or '-'}"
        )
    step = run.reduction_step
    pipeline = step.pipeline
    location = pipeline.processing_location
    if location.storage_type != DataLocation.StorageType.DISK or not location.root_path:
        raise NonRetryableError(
            f"processing location {location} is not a disk location with a root path; runs "
            "need a file system to run in"
        )
    version = run_software_version(run)
    if not version.command:
        raise NonRetryableError(f"software version {version} has no command to run")
    backend = get_backend()
    with RunLeaseKeeper(run.pk, token=token, status=RunStatus.STAGING_DATA) as keeper:
        layout = run_layout(Path(location.root_path), pipeline.pk, run.sub_group_key, run.pk,
                            run.attempt)  # fmt: skip
        make_run_dirs(layout, step_name=step.name)
        final_step = not step.downstream_steps.exists()
        command, env = build_command(
            runtime=settings.CONTAINER_RUNTIME,
            image=version.image_ref,
            sif_path=version.sif_path,
            argv=[str(a) for a in version.command],
            layout=layout,
            step_name=step.name,
            final_step=final_step,
        )
        staged = run_stages_raw_data(run)
        inputs = _link_staged_inputs(run, location, layout, keeper) if staged else []
        products = _copy_upstream_products(run, layout, keeper)
        script = None
        if step.reduction_instrument:
            parameter_set = reduction_script_for_run(run, layout.config)
            script = {
                "instrument": parameter_set.instrument,
                "version": parameter_set.number,
                "path": _container_path(env, "WORKFLOW_CONFIG_DIR", layout.config,
                                        get_instrument(parameter_set.instrument).script_name),
                "checksum": parameter_set.script_checksum,
            }  # fmt: skip
        manifest = _manifest(run, version, env, inputs, products, script, final_step, staged)
        write_manifest(layout, manifest)
        keeper.check()
        env = {
            **env,
            "WORKFLOW_RUN_ID": str(run.pk),
            "WORKFLOW_STEP_NAME": step.name,
            # The job pushes its end to run_job_finished, so the run is collected at once.
            **_completion_push_env(run.pk),
        }
        spec = JobSpec(
            name=job_name(run),
            command=command,
            run_dir=layout.run_dir,
            env=env,
            resources={**DEFAULT_RESOURCES, **(step.resource_requirements or {})},
        )
        pause_point("workflow.before_submit")
        job_id = backend.submit(spec)
        pause_point("workflow.after_submit")
    now = timezone.now()
    try:
        return transition(
            run,
            RunStatus.SUBMITTED,
            actor=f"worker:{owner}",
            reason=f"submitted to {backend.name} as {job_id}",
            where={"claim_token": token},
            updates={
                **_CLEAR_LEASE,
                "hpc_job_id": job_id[:100],
                "submitted_at": now,
                "run_dir": str(layout.run_dir),
                "workspace_dir": str(layout.workspace),
                "log_path": str(layout.logs),
                "idempotency_key": spec.name,
            },
        )
    except TransitionConflict as exc:
        # The job exists under its name; whoever holds the run now finds it there.
        raise ClaimLost(f"run {run.pk}: claim lost after submitting {job_id} ({exc})") from exc


def _completion_push_env(run_id: int) -> dict[str, str]:
    """The environment that makes the job push its end (``job_done_callback_env``), except on
    kombu's file-system broker: its reader moves a message file away while a writer in another
    process may still be writing it, and a half-written message stops the consuming worker
    (JSONDecodeError in the transport). The embedded facility that uses that broker ticks the
    result manager every round, so its runs are collected by polling instead."""
    from pipelines.backends.base import job_done_callback_env

    if str(settings.CELERY_BROKER_URL).startswith("filesystem://"):
        return {}
    return job_done_callback_env(run_id)


def run_software_version(run: ExecutedReductionStep) -> ReductionSoftwareVersion:
    """The version the run was created with; else the step's version; else the newest active
    version of the step's software. Raises ``NonRetryableError`` when there is none."""
    if run.software_version is not None:
        return run.software_version
    step = run.reduction_step
    version = step.software_version or (
        ReductionSoftwareVersion.objects.filter(software=step.software, is_active=True)
        .order_by("-created_at")
        .first()
    )
    if version is None:
        raise NonRetryableError(f"{step.software} has no active version to run {step}")
    return version


def _container_path(env: dict[str, str], key: str, host_dir: Path, *parts: str) -> str:
    """Where the job sees ``host_dir/parts``: under the directory ``env[key]`` names (the
    container's mount point, or the host path itself with runtime ``none``)."""
    base = env.get(key) or str(host_dir)
    return str(Path(base, *parts))


def _link_staged_inputs(
    run: ExecutedReductionStep,
    location: DataLocation,
    layout: RunLayout,
    keeper: RunLeaseKeeper,
) -> list[StagedInput]:
    """Put every raw file of the run's packages into ``layout.input`` (a hard link to the staged
    copy, a copy where links are impossible) and verify the bytes there against the file's
    registered checksum. A mismatch or a missing staged copy marks the copy MISMATCH/MISSING
    (the integrity manager repairs it) and raises ``CorruptInput``: nothing runs on bad data."""
    staged = {
        c.raw_data_file_id: c
        for c in PhysicalCopy.objects.filter(
            raw_data_file__raw_data_package__in=run.input_raw_packages.all(),
            location=location,
            status__in=(PhysicalCopyStatus.STAGED, PhysicalCopyStatus.PRESENT),
        )
    }
    files = (
        RawDataFile.objects.filter(raw_data_package__in=run.input_raw_packages.all())
        .select_related("raw_data_package", "instrument_module__instrument")
        .order_by("raw_data_package_id", "relative_path")
    )
    inputs: list[StagedInput] = []
    for raw_file in files:
        keeper.check()
        package = raw_file.raw_data_package
        assert package is not None
        copy = staged.get(raw_file.pk)
        if copy is None:
            raise CorruptInput(
                f"raw file {raw_file.relative_path} of {package.name} is not staged at {location}"
            )
        source = safe_join(location.root_path, copy.relative_path)
        target = safe_join(str(layout.input), raw_file.relative_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(source, target)
            except FileNotFoundError:
                _mark_copy(copy, PhysicalCopy.Integrity.MISSING, run)
                raise CorruptInput(
                    f"staged input {copy.relative_path} of {package.name} is missing from "
                    f"{location}"
                ) from None
            except OSError:
                shutil.copyfile(source, target)
        digest = checksum_file(target, raw_file.checksum_algorithm)
        if digest != raw_file.checksum:
            _mark_copy(copy, PhysicalCopy.Integrity.MISMATCH, run)
            with contextlib.suppress(OSError):
                target.unlink()
            raise CorruptInput(
                f"staged input {copy.relative_path} of {package.name} at {location} hashes to "
                f"{digest[:16]}..., registered {raw_file.checksum[:16]}...; not run on it"
            )
        inputs.append(
            StagedInput(
                package_id=package.pk,
                package_name=package.name,
                raw_file_id=str(raw_file.pk),
                relative_path=raw_file.relative_path,
                checksum=raw_file.checksum,
                checksum_algorithm=raw_file.checksum_algorithm,
                size=raw_file.size,
                instrument=raw_file.instrument_module.instrument.name,
                module=raw_file.instrument_module.name,
            )
        )
    return inputs


def _mark_copy(copy: PhysicalCopy, integrity: str, run: ExecutedReductionStep) -> None:
    with contextlib.suppress(ForbiddenTransition, TransitionConflict):
        transition(
            copy,
            integrity,
            field="integrity",
            actor=f"run:{run.pk}",
            reason=f"found {integrity} when run {run.pk} verified its inputs",
        )


def _copy_upstream_products(
    run: ExecutedReductionStep, layout: RunLayout, keeper: RunLeaseKeeper
) -> list[tuple[DataProduct, str]]:
    """Copy each upstream product into ``input/products/<its step>/<its run>/<its path>``
    (read-only in the job, like the raw inputs; the manifest's ``upstream_products``),
    verifying the bytes against the product's checksum while they are copied. Returns
    (product, path relative to ``input/``)."""
    copied: list[tuple[DataProduct, str]] = []
    products = run.input_products.select_related("produced_by__reduction_step").order_by("pk")
    for product in products:
        keeper.check()
        upstream = product.produced_by
        source = Path(upstream.run_dir) / product.relative_path
        relative = (
            f"products/{upstream.reduction_step.name}/{upstream.pk}/{_product_subpath(product)}"
        )
        target = safe_join(str(layout.input), relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher = new_hasher(product.checksum_algorithm)
        try:
            with open(source, "rb") as reader, open(target, "wb") as writer:
                for chunk in iter(lambda: reader.read(1 << 20), b""):
                    hasher.update(chunk)
                    writer.write(chunk)
        except FileNotFoundError:
            raise CorruptInput(
                f"upstream product {product.pk} ({product.relative_path} of run {upstream.pk}) "
                f"is missing at {source}"
            ) from None
        if hasher.hexdigest() != product.checksum:
            raise CorruptInput(
                f"upstream product {product.pk} ({product.relative_path} of run {upstream.pk}) "
                "does not match its checksum; not run on it"
            )
        copied.append((product, relative))
    return copied


def _product_subpath(product: DataProduct) -> str:
    """The product's path below its producer's output directory: ``output/science/x`` ->
    ``science/x``; ``workspace/calibrate/x`` -> ``x``."""
    parts = Path(product.relative_path).parts
    if parts and parts[0] == "output":
        return str(Path(*parts[1:]))
    if len(parts) > 2 and parts[0] == "workspace":
        return str(Path(*parts[2:]))
    return product.relative_path


def _manifest(
    run: ExecutedReductionStep,
    version: ReductionSoftwareVersion,
    env: dict[str, str],
    inputs: list[StagedInput],
    products: list[tuple[DataProduct, str]],
    script: dict[str, Any] | None,
    final_step: bool,
    staged: bool = True,
) -> dict[str, Any]:
    """``manifest.json`` (schema 1 of ``pipelines.containers.write_manifest``): the step's
    parameters, the staged inputs and upstream products with their checksums (paths relative to
    ``input/``), what was left out and why, and the pinned reduction script."""
    step = run.reduction_step
    parameters = run.config_snapshot or (step.config.parameters if step.config else {})
    return {
        "run_id": run.pk,
        "attempt": run.attempt,
        "job_name": job_name(run),
        "pipeline_id": step.pipeline_id,
        "pipeline": step.pipeline.name,
        "step": step.name,
        "is_final_step": final_step,
        "sub_group_key": run.sub_group_key,
        "sub_group_values": run.sub_group_values,
        "software": version.software.name,
        "version": version.version,
        "image": version.image_ref,
        "parameters": parameters,
        "output_dir": env.get("WORKFLOW_OUTPUT_DIR", ""),
        # The sub-group's packages (lineage), staged into input/ or not (``raw_data_staged``:
        # false for a step that reads only its upstream products).
        "raw_data_package_ids": sorted(run.input_raw_packages.values_list("pk", flat=True)),
        "raw_data_staged": staged,
        "inputs": [
            {
                "path": i.relative_path,
                "checksum": i.checksum,
                "checksum_algorithm": i.checksum_algorithm,
                "size": i.size,
                "raw_data_file_id": i.raw_file_id,
                "raw_data_package_id": i.package_id,
                "package": i.package_name,
                "instrument": i.instrument,
                "module": i.module,
            }
            for i in inputs
        ],
        "upstream_products": [
            {
                "path": relative,
                "checksum": product.checksum,
                "checksum_algorithm": product.checksum_algorithm,
                "size": product.size_bytes,
                "product_id": product.pk,
                "product_type": DataProductType(product.product_type).name,
                "filename": product.filename,
                "step": product.produced_by.reduction_step.name,
                "run_id": product.produced_by_id,
            }
            for product, relative in products
        ],
        "excluded_inputs": run.excluded_inputs,
        "reduction_script": script,
    }
