"""Simulated observations of the demo facility: seeded scans whose raw files are written into
the instruments' SOURCE locations and registered through the ingest service.

Used by ``manage.py simulate_observations`` and ``demo`` and by tests. Idempotent: simulating N
scans twice creates them once (ids are derived from the seed and the scan index). Needs the
facility of ``pipelines.demo.facility`` loaded first.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.utils.text import slugify

from pipelines.models import DataLocation, ExecutedObsUnit, InstrumentModule, ObsUnit, RawDataFile
from pipelines.services.ingest import (
    executed_obs_unit_finish,
    executed_obs_unit_start,
    raw_data_file_register,
)
from pipelines.storage.checksums import checksum_bytes
from pipelines.storage.paths import safe_join

from .facility import FILE_TYPE_BY_INSTRUMENT, LT, OBS_UNITS, SOURCE_LOCATION_BY_INSTRUMENT


class DemoNotLoaded(RuntimeError):
    """The demo facility (or the part a command needs) is not in the database."""


# Scan and file ids are uuid5 names under this namespace, so a re-run finds what it made before.
SIMULATION_NAMESPACE = uuid.UUID("6f1c2d8e-4b7a-5e39-9c0d-2a8f3e6b1c47")
# Scans are laid out from here, one every SCAN_SPACING, so re-runs produce the same start times.
SIMULATION_EPOCH = datetime(2025, 1, 6, 0, 0, tzinfo=UTC)
SCAN_SPACING = timedelta(minutes=45)


@dataclass
class Simulation:
    scans_created: int = 0
    scans_present: int = 0
    files_created: int = 0
    files_present: int = 0
    bytes_written: int = 0

    def summary(self) -> str:
        return (
            f"Simulated observations: {_plural(self.scans_created, 'scan')} created, "
            f"{self.scans_present} already present; {_plural(self.files_created, 'file')} "
            f"registered ({_plural(self.bytes_written, 'byte')} written), "
            f"{self.files_present} already registered"
        )


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _scan_id(seed: int, index: int) -> uuid.UUID:
    return uuid.uuid5(SIMULATION_NAMESPACE, f"seed={seed}/scan={index}")


def _module_slug(name: str) -> str:
    return slugify(name).replace("-", "")


def demo_observations_simulate(
    *,
    count: int,
    seed: int = 0,
    files_per_module: int = 3,
    file_size: int = 64 * 1024,
    actor: str = "simulate_observations",
    progress: Callable[[int, int, ExecutedObsUnit], None] | None = None,
) -> Simulation:
    """Run scans 0..count-1 of the seeded simulation through the ingest service.

    Each scan picks a demo obs unit, starts, writes ``files_per_module`` files of ``file_size``
    pseudo-random bytes per module of the obs unit into that instrument's SOURCE location
    (``<date>/<scan id>/<module>/...``), registers them with verification, and finishes.
    A scan left running by an interrupted run is resumed; a finished scan is not run again, but
    gets the files it lacks (a re-run with a larger ``files_per_module``). Files already
    registered are counted, never rewritten, so the same arguments twice create nothing new.
    ``progress(done, count, scan)`` is called after each scan. Raises ``DemoNotLoaded`` when the
    demo obs units or source locations are missing.
    """
    if count < 0 or files_per_module < 0 or file_size < 0:
        raise ValueError("count, files_per_module and file_size must not be negative")
    obs_units = list(ObsUnit.objects.filter(name__in=OBS_UNITS, active=True).order_by("name"))
    locations = {
        instrument: DataLocation.objects.filter(
            site__short_name="ccat", name=name, location_type=LT.SOURCE
        ).first()
        for instrument, name in SOURCE_LOCATION_BY_INSTRUMENT.items()
    }
    missing = [name for name, loc in locations.items() if loc is None]
    if not obs_units or missing:
        raise DemoNotLoaded(
            "the demo facility is not loaded (no demo obs units or source locations for "
            f"{', '.join(missing) or 'the instruments'}); run `manage.py load_demo_facility` first"
        )
    result = Simulation()
    for index in range(count):
        scan = _simulate_scan(
            index,
            seed=seed,
            obs_units=obs_units,
            locations={k: v for k, v in locations.items() if v is not None},
            files_per_module=files_per_module,
            file_size=file_size,
            actor=actor,
            result=result,
        )
        if progress is not None:
            progress(index + 1, count, scan)
    return result


def _simulate_scan(
    index: int,
    *,
    seed: int,
    obs_units: list[ObsUnit],
    locations: dict[str, DataLocation],
    files_per_module: int,
    file_size: int,
    actor: str,
    result: Simulation,
) -> ExecutedObsUnit:
    scan_id = _scan_id(seed, index)
    existing = ExecutedObsUnit.objects.filter(pk=scan_id).select_related("obs_unit").first()
    if existing is not None and existing.status != ExecutedObsUnit.ObsStatus.RUNNING:
        # A finished scan still gets the files a larger --files-per-module asks for, and the
        # ones it has are counted, so a re-run reports what is there.
        result.scans_present += 1
        _simulate_files(
            existing,
            seed=seed,
            index=index,
            locations=locations,
            files_per_module=files_per_module,
            file_size=file_size,
            actor=actor,
            result=result,
        )
        return existing
    rng = random.Random(f"seed={seed}/scan={index}")
    obs_unit = existing.obs_unit if existing is not None else rng.choice(obs_units)
    start_time = SIMULATION_EPOCH + index * SCAN_SPACING + timedelta(seconds=rng.randint(0, 300))
    if existing is not None:
        start_time = existing.start_time
    duration = timedelta(seconds=rng.randint(300, 1800))
    configurations = list(
        obs_unit.instrument_module_configurations.select_related(
            "instrument_module__instrument"
        ).order_by("instrument_module__instrument__name", "instrument_module__name", "name")
    )
    scan, created = executed_obs_unit_start(
        obs_unit=obs_unit,
        start_time=start_time,
        id=scan_id,
        metadata={"simulated": True, "seed": seed, "index": index},
        instrument_module_configurations=configurations,
        actor=actor,
    )
    if created:
        result.scans_created += 1
    else:
        result.scans_present += 1

    _simulate_files(
        scan,
        seed=seed,
        index=index,
        locations=locations,
        files_per_module=files_per_module,
        file_size=file_size,
        actor=actor,
        result=result,
    )
    executed_obs_unit_finish(
        scan,
        end_time=start_time + duration,
        status=ExecutedObsUnit.ObsStatus.COMPLETED,
        conditions={
            "pwv_mm": round(rng.uniform(0.3, 1.5), 2),
            "elevation_deg": round(rng.uniform(30.0, 75.0), 1),
        },
        actor=actor,
    )
    return scan


def _simulate_files(
    scan: ExecutedObsUnit,
    *,
    seed: int,
    index: int,
    locations: dict[str, DataLocation],
    files_per_module: int,
    file_size: int,
    actor: str,
    result: Simulation,
) -> None:
    """Files 0..files_per_module-1 of every module the scan was started with: the missing ones
    are written and registered, the others counted as present."""
    configurations = scan.instrument_module_configurations.select_related(
        "instrument_module__instrument"
    ).order_by("instrument_module__instrument__name", "instrument_module__name", "name")
    modules = {c.instrument_module_id: c.instrument_module for c in configurations}
    for module in modules.values():
        instrument = module.instrument.name
        for number in range(files_per_module):
            _simulate_file(
                scan,
                module,
                number,
                seed=seed,
                index=index,
                location=locations[instrument],
                file_type=FILE_TYPE_BY_INSTRUMENT.get(instrument, "dat"),
                file_size=file_size,
                actor=actor,
                result=result,
            )


def _simulate_file(
    scan: ExecutedObsUnit,
    module: InstrumentModule,
    number: int,
    *,
    seed: int,
    index: int,
    location: DataLocation,
    file_type: str,
    file_size: int,
    actor: str,
    result: Simulation,
) -> None:
    slug = _module_slug(module.name)
    # The first file of a module is its header; data files go one level deeper, as instrument
    # writers do, so packaging has nested trees to preserve.
    directory = f"{scan.start_time:%Y%m%d}/{scan.pk}/{slug}"
    if number > 0:
        directory += f"/subscan_{(number - 1) // 2:03d}"
    relative_path = f"{directory}/{slug}_{number:04d}.{file_type}"
    file_id = uuid.uuid5(SIMULATION_NAMESPACE, f"{scan.pk}/{relative_path}")
    if RawDataFile.objects.filter(pk=file_id).exists():
        result.files_present += 1
        return
    data = random.Random(f"seed={seed}/scan={index}/{module.name}/{number}").randbytes(file_size)
    target = safe_join(location.root_path, relative_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a file the registration reads is always complete.
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    result.bytes_written += len(data)
    _, created = raw_data_file_register(
        id=file_id,
        executed_obs_unit=scan,
        instrument_module=module,
        source_location=location,
        relative_path=relative_path,
        size=len(data),
        checksum=checksum_bytes(data, location.checksum_algorithm),
        checksum_algorithm=location.checksum_algorithm,
        file_type=file_type,
        metadata={"module": module.name, "file_number": number, "simulated": True},
        verify=True,
        actor=actor,
    )
    if created:
        result.files_created += 1
    else:
        result.files_present += 1
