"""Staging (seed 002): archived packages brought to a PROCESSING location, unpacked and verified.

``process_staging_jobs`` is the manager (claim pending jobs, dispatch ``stage_data_task`` to the
staging queue of the job's destination); ``staging_job_run`` the worker's service for one job:
per package, copy the tar from a long-term archive (hashed while copying, read back), unpack
each raw file checking it against its registered checksum, remove the tar, and register the
files' copies STAGED. A package whose files are all staged there already is skipped, so a
repeated job is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
from typing import Any

from django.db import transaction
from django.db.models import Q

from pipelines.exceptions import ChecksumMismatch, NonRetryableError, StorageUnavailable
from pipelines.models import (
    DataLocation,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataPackage,
    StagingJob,
)
from pipelines.storage.base import Storage, copy, storage_for

from .operations import (
    LeaseKeeper,
    operation_claim_and_dispatch,
    operation_complete,
    operation_start,
)
from .states import record_creation

log = logging.getLogger(__name__)
LT = DataLocation.LocationType
STAGING_TAR_DIR = "staging"
LIVE_FILE_COPY = (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED)


def staging_job_create(
    packages: list[RawDataPackage], *, destination: DataLocation, user: Any = None, actor: str
) -> StagingJob:
    """A pending StagingJob for ``packages`` to the PROCESSING location ``destination``.
    Raises ``NonRetryableError`` for a destination that is not an active PROCESSING location,
    no packages, or a package that is not ARCHIVED (nothing to stage from)."""
    if destination.location_type != LT.PROCESSING or not destination.active:
        raise NonRetryableError(f"{destination} is not an active PROCESSING location")
    if not packages:
        raise NonRetryableError("no packages to stage")
    unarchived = [p.name for p in packages if p.state != "archived"]
    if unarchived:
        raise NonRetryableError(f"not archived, so not stageable: {', '.join(unarchived[:10])}")
    with transaction.atomic():
        job = StagingJob.objects.create(user=user, destination_location=destination)
        job.raw_data_packages.set(packages)
        record_creation(job, actor=actor, reason=f"stage {len(packages)} package(s)")
    return job


def process_staging_jobs(
    verbose: bool = False, *, owner: str = "staging-manager"
) -> dict[str, int]:
    """The staging manager (seed 002): claim pending jobs and send each to the staging queue of
    its destination after the claim commits. A job whose destination is not accepting writes
    (the disk monitor found it full) stays pending until it is reopened."""
    from pipelines.queues import OperationType, queue_name
    from pipelines.tasks import stage_data_task

    claimed = operation_claim_and_dispatch(
        StagingJob,
        stage_data_task,
        owner=owner,
        queryset=StagingJob.objects.due().filter(destination_location__accepting_writes=True),
        select_related=("destination_location__site",),
        queue_of=lambda job: queue_name(job.destination_location, OperationType.STAGING),
    )
    if verbose:
        log.info("staging: %d job(s) dispatched", claimed)
    return {"claimed": claimed}


def staging_manager_tick(*, owner: str) -> dict[str, int]:
    return process_staging_jobs(owner=owner)


def staging_job_run(
    job_id: int, *, token: str, owner: str, lease_seconds: int | None = None
) -> StagingJob:
    """Stage every package of one claimed job (see the module docstring). Raises
    ``StorageUnavailable`` when no archive holds a verified copy of a package (retryable: an
    archive may come back), ``ChecksumMismatch`` for bytes that do not match (nothing of that
    package is registered, what was written is removed)."""
    job = StagingJob.objects.select_related("destination_location__site").get(pk=job_id)
    job = operation_start(job, token=token, owner=owner, lease_seconds=lease_seconds)
    here = storage_for(job.destination_location)
    actor = f"worker:{owner}"
    staged = 0
    with LeaseKeeper(StagingJob, job.pk, token=token, lease_seconds=lease_seconds) as keeper:
        for package in job.raw_data_packages.order_by("pk"):
            keeper.check()
            if _already_staged(package, job.destination_location):
                continue
            files = _stage_package(job, package, here, keeper)
            with transaction.atomic():
                for raw_file, checksum in files:
                    _register_staged(raw_file, job.destination_location, checksum, actor, job)
            staged += 1
    return operation_complete(
        job,
        token=token,
        actor=actor,
        reason=f"{staged} package(s) staged to {here.label}",
        updates={"idempotency_key": f"staging_job:{job.pk}"},
    )


def _already_staged(package: RawDataPackage, location: DataLocation) -> bool:
    files = package.files.count()
    present = (
        PhysicalCopy.objects.filter(
            raw_data_file__raw_data_package=package, location=location, status__in=LIVE_FILE_COPY
        )
        .values("raw_data_file_id")
        .distinct()
        .count()
    )
    return files > 0 and present == files


def archive_copy_for(package: RawDataPackage, *, near: DataLocation) -> PhysicalCopy:
    """A verified PRESENT copy of ``package`` in an active long-term archive, preferring the
    destination's own site. Raises ``StorageUnavailable`` when there is none."""
    copies = list(
        PhysicalCopy.objects.filter(
            raw_data_package=package,
            status=PhysicalCopyStatus.PRESENT,
            integrity=PhysicalCopy.Integrity.VERIFIED,
            location__location_type=LT.LONG_TERM_ARCHIVE,
            location__active=True,
        ).select_related("location__site")
    )
    if not copies:
        raise StorageUnavailable(f"no active archive holds a verified copy of {package.name}")
    copies.sort(key=lambda c: (c.location.site_id != near.site_id, -c.location.priority, c.pk))
    return copies[0]


def _stage_package(
    job: StagingJob, package: RawDataPackage, here: Storage, keeper: LeaseKeeper
) -> list[tuple[Any, str]]:
    source_copy = archive_copy_for(package, near=job.destination_location)
    source = storage_for(source_copy.location)
    tar_path = f"{STAGING_TAR_DIR}/{job.pk}/{package.name}"
    written: list[str] = []
    try:
        copy(
            source, source_copy.relative_path, here, tar_path, algorithm=package.checksum_algorithm
        )
        stored, _size = here.checksum(tar_path, package.checksum_algorithm)
        if stored != package.checksum:
            raise ChecksumMismatch(
                f"package {package.name} staged from {source.label} reads back as "
                f"{stored[:16]}..., registered {package.checksum[:16]}..."
            )
        expected = {f.relative_path: f for f in package.files.all()}
        results: list[tuple[Any, str]] = []
        with here.get_stream(tar_path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                keeper.check()
                raw_file = expected.get(member.name)
                if raw_file is None or not member.isfile():
                    raise NonRetryableError(
                        f"package {package.name} holds {member.name!r}, not one of its files"
                    )
                reader = tar.extractfile(member)
                assert reader is not None
                checksum, _ = here.put_stream(
                    raw_file.relative_path, reader, algorithm=raw_file.checksum_algorithm
                )
                written.append(raw_file.relative_path)
                if checksum != raw_file.checksum:
                    raise ChecksumMismatch(
                        f"raw file {raw_file.relative_path} staged from {package.name} hashes "
                        f"to {checksum[:16]}..., registered {raw_file.checksum[:16]}..."
                    )
                results.append((raw_file, checksum))
        missing = sorted(set(expected) - set(written))
        if missing:
            raise ChecksumMismatch(f"package {package.name} lacks {', '.join(missing[:10])}")
    except BaseException:
        for path in written:
            with contextlib.suppress(Exception):
                here.delete(path)
        raise
    finally:
        with contextlib.suppress(Exception):
            here.delete(tar_path)
    return results


def _register_staged(
    raw_file: Any, location: DataLocation, checksum: str, actor: str, job: StagingJob
) -> None:
    from django.utils import timezone

    existing = (
        PhysicalCopy.objects.select_for_update()
        .filter(raw_data_file=raw_file, location=location)
        .filter(Q(status__in=LIVE_FILE_COPY))
        .first()
    )
    if existing is not None:
        return
    copy_row = PhysicalCopy.objects.create(
        kind=PhysicalCopy.Kind.RAW_DATA_FILE,
        raw_data_file=raw_file,
        location=location,
        relative_path=raw_file.relative_path,
        status=PhysicalCopyStatus.STAGED,
        integrity=PhysicalCopy.Integrity.VERIFIED,
        verified_checksum=checksum,
        checksum_verified_at=timezone.now(),
    )
    record_creation(copy_row, actor=actor, reason=f"staged by staging job {job.pk}")
