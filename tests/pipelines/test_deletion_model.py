"""Randomised model test of deletion (seeded loop): ingest, transfer, archive, staging with runs
holding their inputs, integrity failures and repairs, worker deaths with lease recovery, and
deletion ticks and workers, in random order.

After every step: no archived package lost its last good copy (a PRESENT-like, verified package
copy whose file is on disk), and every DELETED copy passed DELETION_SCHEDULED and
DELETION_IN_PROGRESS. After a fault-free drain at the end: nothing is left mid-deletion, and
every copy the policy allows is DELETED (a system that never deletes fails).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from pipelines.models import (
    CopyRepair,
    DataLocation,
    DeletionTask,
    ExecutedReductionStep,
    LongTermArchiveTransfer,
    PackageState,
    PhysicalCopy,
    PhysicalCopyStatus,
    RawDataPackage,
    RunStatus,
    StagingJob,
    StateEvent,
    Status,
)
from pipelines.services import deletion
from pipelines.services.archive import mark_archived
from pipelines.services.copies import copy_lock_object, copy_register_verified
from pipelines.services.deletion import (
    RETRY_FAILED_AFTER,
    deletion_manager_tick,
    deletion_plan,
    physical_copy_delete,
)
from pipelines.services.integrity import copy_mark_damaged
from pipelines.services.recovery import recover_expired_leases
from pipelines.services.states import transition
from tests import factories as f

CS = PhysicalCopyStatus
LT = DataLocation.LocationType
KIND = PhysicalCopy.Kind
GOOD_STATES = (CS.PRESENT, CS.STAGED, CS.DELETION_POSSIBLE, CS.DELETION_SCHEDULED)
SEEDS = (1, 2, 3, 4)
STEPS = 150
# Keeps the whole test well under the three-minute budget on a slow machine.
TIME_BUDGET_SECONDS = 150


class Killed(BaseException):
    """A worker process dying: not an Exception, so nothing catches it on the way out."""


@dataclass
class Model:
    rng: random.Random
    root: Path
    locations: dict[str, DataLocation] = field(default_factory=dict)
    packages: list[RawDataPackage] = field(default_factory=list)
    counter: int = 0

    # -- helpers ------------------------------------------------------------------------------
    def write(self, location: DataLocation, relative_path: str) -> None:
        path = Path(location.root_path) / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    def exists(self, copy: PhysicalCopy) -> bool:
        return (Path(copy.location.root_path) / copy.relative_path).exists()

    def pick(self, items: list[Any]) -> Any:
        return self.rng.choice(items) if items else None

    def register(self, package: RawDataPackage, location: DataLocation) -> None:
        self.write(location, package.relative_path)
        copy_register_verified(
            package,
            kind=KIND.RAW_DATA_PACKAGE,
            location=location,
            relative_path=package.relative_path,
            checksum=package.checksum,
            actor="model",
            reason="model",
        )

    # -- actions ------------------------------------------------------------------------------
    def ingest(self) -> None:
        self.counter += 1
        package = f.RawDataPackageFactory(
            status=Status.COMPLETED, origin_location=self.locations["obs_buffer"]
        )
        for _ in range(2):
            raw = f.RawDataFileFactory(
                source_location=self.locations["source"],
                raw_data_package=package,
                executed_obs_unit=package.executed_obs_unit,
                instrument_module=package.instrument_module,
            )
            self.write(self.locations["source"], raw.relative_path)
            PhysicalCopy.objects.create(
                kind=KIND.RAW_DATA_FILE,
                raw_data_file=raw,
                location=self.locations["source"],
                relative_path=raw.relative_path,
                integrity=PhysicalCopy.Integrity.VERIFIED,
                checksum_verified_at=timezone.now(),
                verified_checksum=raw.checksum,
            )
        self.register(package, self.locations["obs_buffer"])
        self.packages.append(package)

    def transfer(self) -> None:
        waiting = [p for p in self.packages if not _has_copy(p, self.locations["arc_buffer"])]
        package = self.pick(waiting)
        if package is None:
            return
        with transaction.atomic():
            self.register(package, self.locations["arc_buffer"])
            LongTermArchiveTransfer.objects.create(
                raw_data_package=package,
                origin_location=self.locations["arc_buffer"],
                destination_location=self.locations["lta"],
            )

    def archive(self) -> None:
        live = list(LongTermArchiveTransfer.objects.filter(status=Status.PENDING))
        transfer = self.pick(live)
        if transfer is None:
            return
        package = transfer.raw_data_package
        with transaction.atomic():
            LongTermArchiveTransfer.objects.filter(pk=transfer.pk).update(status=Status.COMPLETED)
            self.register(package, self.locations["lta"])
            mark_archived(package, actor="model", where="lta")

    def stage(self) -> None:
        archived = [p for p in self.packages if _state(p) == PackageState.ARCHIVED]
        package = self.pick(archived)
        if package is None:
            return
        processing = self.locations["processing"]
        with transaction.atomic():
            job = StagingJob.objects.create(
                destination_location=processing, status=Status.COMPLETED
            )
            job.raw_data_packages.set([package])
            for raw in package.files.all():
                live = PhysicalCopy.objects.filter(raw_data_file=raw, location=processing).exclude(
                    status=CS.DELETED
                )
                if not live.exists():
                    self.write(processing, raw.relative_path)
                    PhysicalCopy.objects.create(
                        kind=KIND.RAW_DATA_FILE,
                        raw_data_file=raw,
                        location=processing,
                        relative_path=raw.relative_path,
                        status=CS.STAGED,
                        integrity=PhysicalCopy.Integrity.VERIFIED,
                        checksum_verified_at=timezone.now(),
                    )
            run = f.ExecutedReductionStepFactory(status=RunStatus.RUNNING, staging_job=job)
            run.input_raw_packages.set([package])

    def finish_staging(self) -> None:
        job = self.pick(list(StagingJob.objects.filter(active=True)))
        if job is None:
            return
        ExecutedReductionStep.objects.filter(staging_job=job).update(status=RunStatus.COMPLETED)
        StagingJob.objects.filter(pk=job.pk).update(active=False)

    def damage(self) -> None:
        """An archive copy found bad, only while another good copy of the package exists (a
        damage no deletion policy could survive says nothing about deletion)."""
        archive_copies = list(
            PhysicalCopy.objects.filter(
                location=self.locations["lta"],
                status=CS.PRESENT,
                integrity=PhysicalCopy.Integrity.VERIFIED,
            )
        )
        copy = self.pick(archive_copies)
        if copy is None or _good_copies(self, copy.raw_data_package_id, but=copy.pk) == 0:
            return
        copy_mark_damaged(copy, PhysicalCopy.Integrity.MISMATCH, actor="model", reason="model")

    def repair(self) -> None:
        repair = self.pick(list(CopyRepair.objects.filter(status=Status.PENDING)))
        if repair is None:
            return
        with transaction.atomic():
            copy = repair.physical_copy
            copy_lock_object(copy)
            copy.refresh_from_db()
            CopyRepair.objects.filter(pk=repair.pk).update(status=Status.COMPLETED)
            if copy.integrity != PhysicalCopy.Integrity.VERIFIED:
                self.write(copy.location, copy.relative_path)
                transition(
                    copy,
                    PhysicalCopy.Integrity.VERIFIED,
                    field="integrity",
                    actor="model",
                    reason="repaired",
                    updates={"checksum_verified_at": timezone.now()},
                )

    def tick(self) -> None:
        deletion_manager_tick(owner="model", now=timezone.now() + RETRY_FAILED_AFTER * 2)

    def work(self) -> None:
        for task in DeletionTask.objects.filter(status=Status.SCHEDULED).order_by("?")[:3]:
            physical_copy_delete(task.pk, token=task.claim_token, owner="model")

    def die(self, monkeypatch: pytest.MonkeyPatch) -> None:
        task = self.pick(list(DeletionTask.objects.filter(status=Status.SCHEDULED)))
        if task is None:
            return
        unlink_first = self.rng.random() < 0.5

        def killed(name: str) -> None:
            if name != "deletion.mid_delete":
                return
            if unlink_first:
                copy = PhysicalCopy.objects.select_related("location").get(pk=task.physical_copy_id)
                (Path(copy.location.root_path) / copy.relative_path).unlink(missing_ok=True)
            raise Killed(name)

        monkeypatch.setattr(deletion, "pause_point", killed)
        try:
            physical_copy_delete(task.pk, token=task.claim_token, owner="doomed")
        except Killed:
            pass
        finally:
            monkeypatch.undo()
        # The worker is gone: its lease runs out and the reconciler hands the task back.
        DeletionTask.objects.filter(pk=task.pk, status__in=("scheduled", "in_progress")).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        recover_expired_leases()


def _has_copy(package: RawDataPackage, location: DataLocation) -> bool:
    return (
        PhysicalCopy.objects.filter(raw_data_package=package, location=location)
        .exclude(status=CS.DELETED)
        .exists()
    )


def _state(package: RawDataPackage) -> str:
    return RawDataPackage.objects.values_list("state", flat=True).get(pk=package.pk)


def _good_copies(model: Model, package_id: Any, *, but: int | None = None) -> int:
    copies = PhysicalCopy.objects.filter(
        raw_data_package_id=package_id,
        status__in=GOOD_STATES,
        integrity=PhysicalCopy.Integrity.VERIFIED,
    ).select_related("location")
    return sum(1 for c in copies if c.pk != but and model.exists(c))


def _check_invariants(model: Model, step: str) -> None:
    for package in RawDataPackage.objects.filter(state=PackageState.ARCHIVED):
        assert _good_copies(model, package.pk) >= 1, f"after {step}: {package} has no good copy"
    events: dict[str, list[str]] = {}
    for object_id, to_state in (
        StateEvent.objects.filter(entity="physical_copy", field="status")
        .order_by("pk")
        .values_list("object_id", "to_state")
    ):
        events.setdefault(object_id, []).append(to_state)
    for pk in PhysicalCopy.objects.filter(status=CS.DELETED).values_list("pk", flat=True):
        path = events.get(str(pk), [])
        assert path[-3:] == [CS.DELETION_SCHEDULED, CS.DELETION_IN_PROGRESS, CS.DELETED], (
            f"after {step}: deleted copy {pk} went {path}"
        )


def _world(root: Path) -> dict[str, DataLocation]:
    obs = f.SiteFactory(short_name="obs")
    arc = f.SiteFactory(short_name="arc")

    def loc(site: Any, name: str, kind: str, retention: timedelta) -> DataLocation:
        return f.DataLocationFactory(
            site=site,
            name=name,
            location_type=kind,
            root_path=str(root / site.short_name / name),
            retention_period=retention,
        )

    return {
        "source": loc(obs, "source", LT.SOURCE, timedelta(0)),
        "obs_buffer": loc(obs, "buffer", LT.BUFFER, timedelta(0)),
        "arc_buffer": loc(arc, "buffer", LT.BUFFER, timedelta(0)),
        "lta": loc(arc, "lta", LT.LONG_TERM_ARCHIVE, timedelta(days=7)),
        "processing": loc(arc, "processing", LT.PROCESSING, timedelta(0)),
    }


def _drain(model: Model) -> None:
    """Let every operation finish without faults, then tick and work until nothing moves."""
    ExecutedReductionStep.objects.filter(status=RunStatus.RUNNING).update(
        status=RunStatus.COMPLETED
    )
    StagingJob.objects.update(active=False)
    while CopyRepair.objects.filter(status=Status.PENDING).exists():
        model.repair()
    while LongTermArchiveTransfer.objects.filter(status=Status.PENDING).exists():
        model.archive()
    for _ in range(10):
        counts = deletion_manager_tick(owner="drain", now=timezone.now() + RETRY_FAILED_AFTER * 2)
        for task in DeletionTask.objects.filter(status=Status.SCHEDULED):
            physical_copy_delete(task.pk, token=task.claim_token, owner="drain")
        if not any(counts.values()):
            break


@pytest.mark.django_db
@pytest.mark.parametrize("seed", SEEDS)
def test_random_histories_never_lose_the_last_good_copy_and_delete_all_they_may(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    model = Model(rng=random.Random(seed), root=tmp_path, locations=_world(tmp_path))
    actions = {
        "ingest": (3, model.ingest),
        "transfer": (3, model.transfer),
        "archive": (3, model.archive),
        "stage": (2, model.stage),
        "finish_staging": (2, model.finish_staging),
        "damage": (2, model.damage),
        "repair": (2, model.repair),
        "tick": (5, model.tick),
        "work": (4, model.work),
        "die": (2, lambda: model.die(monkeypatch)),
        "recover": (1, recover_expired_leases),
    }
    names = list(actions)
    weights = [actions[name][0] for name in names]
    history: list[str] = []
    for _ in range(STEPS):
        name = model.rng.choices(names, weights)[0]
        history.append(name)
        actions[name][1]()
        _check_invariants(model, " -> ".join(history[-6:]))
        if time.monotonic() - started > TIME_BUDGET_SECONDS / len(SEEDS):
            break
    _drain(model)
    _check_invariants(model, "drain")
    assert not PhysicalCopy.objects.filter(
        status__in=(CS.DELETION_SCHEDULED, CS.DELETION_IN_PROGRESS)
    ).exists()
    allowed = [entry for entry in deletion_plan() if entry.verdict.deletable]
    assert allowed == [], f"the drain left deletable copies: {allowed[:5]}"
    archived = RawDataPackage.objects.filter(state=PackageState.ARCHIVED)
    if archived.exists():
        # With every run finished and every repair done, an archived package keeps only its
        # archive copy: the source files, both buffers' tars and the staged files are gone.
        assert (
            not PhysicalCopy.objects.filter(
                raw_data_file__raw_data_package__in=archived, location__location_type=LT.SOURCE
            )
            .exclude(status=CS.DELETED)
            .exists()
        )
        assert PhysicalCopy.objects.filter(status=CS.DELETED).count() > 0
