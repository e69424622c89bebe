"""The demo facility: a CCAT-like observatory, its sites and storage, and its users.

Used by ``manage.py load_demo_facility`` and ``demo``, by the simulator beside this module
(``pipelines.demo.simulate``) and by tests that want a realistic world. Loading is idempotent:
loading twice changes nothing.

The definition is literal data below; the builders only walk it. Demo passwords are for a
laptop demo only and are never reset on an existing user unless asked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import models, transaction

import access
from pipelines.models import (
    DataLocation,
    DataTransferRoute,
    Instrument,
    InstrumentModule,
    InstrumentModuleConfiguration,
    Line,
    Observatory,
    ObservingProgram,
    ObsMode,
    ObsUnit,
    Site,
    Source,
    SubObservingProgram,
    Telescope,
)
from pipelines.models.workflow import (
    DataGrouping,
    Pipeline,
    ReductionSoftware,
    ReductionSoftwareVersion,
    ReductionStep,
    ReductionStepConfig,
    TriggerType,
    VersionPolicy,
)

DEFAULT_PASSWORD = "workflow-demo"  # demo only; production users never get a default password
ACTOR = "demo"

LT = DataLocation.LocationType
RT = DataTransferRoute.RouteType
ST = Source.SourceType

# --- The facility, as data ----------------------------------------------------------------------
OBSERVATORY = {
    "name": "CCAT Observatory",
    "short_name": "ccat",
    "description": "Fred Young Submillimeter Telescope and its instruments.",
}
TELESCOPE = {
    "name": "FYST",
    "description": "Fred Young Submillimeter Telescope, 6 m crossed-Dragone.",
    "site_description": "Cerro Chajnantor, Atacama, Chile",
    "latitude_deg": -22.9856,
    "longitude_deg": -67.7404,
    "altitude_m": 5600.0,
}

# instrument name -> (type, description, modules); module -> (pixels, fmin, fmax, configurations)
INSTRUMENTS: dict[str, dict[str, Any]] = {
    "CHAI": {
        "instrument_type": "heterodyne",
        "description": "CCAT Heterodyne Array Instrument: two 64-pixel arrays observed at once.",
        "modules": {
            "LFA": {
                "pixels": 64,
                "freq_min_ghz": 455.0,
                "freq_max_ghz": 495.0,
                "description": "Low-frequency array",
                "configurations": {
                    "CO43": {"lo_ghz": 461.0408, "sideband": "usb", "bandwidth_ghz": 4.0},
                    "CI10": {"lo_ghz": 492.1607, "sideband": "lsb", "bandwidth_ghz": 4.0},
                },
            },
            "HFA": {
                "pixels": 64,
                "freq_min_ghz": 800.0,
                "freq_max_ghz": 820.0,
                "description": "High-frequency array",
                "configurations": {
                    "CO76": {"lo_ghz": 806.6518, "sideband": "usb", "bandwidth_ghz": 4.0},
                    "CI21": {"lo_ghz": 809.3420, "sideband": "lsb", "bandwidth_ghz": 4.0},
                },
            },
        },
    },
    "Prime-Cam": {
        "instrument_type": "camera",
        "description": "Prime-Cam: modular KID camera for continuum and line-intensity mapping.",
        "modules": {
            "280 GHz": {
                "pixels": 10368,
                "freq_min_ghz": 255.0,
                "freq_max_ghz": 305.0,
                "description": "280 GHz broadband polarimetric module",
                "configurations": {
                    "wide": {"readout": "rfsoc", "sample_rate_hz": 1000, "tone_power_dbm": -85},
                },
            },
            "350 GHz": {
                "pixels": 10368,
                "freq_min_ghz": 320.0,
                "freq_max_ghz": 380.0,
                "description": "350 GHz broadband module",
                "configurations": {
                    "wide": {"readout": "rfsoc", "sample_rate_hz": 1000, "tone_power_dbm": -85},
                },
            },
        },
    },
}

# Where each instrument writes its raw files (a SOURCE location at the ccat site).
SOURCE_LOCATION_BY_INSTRUMENT = {"CHAI": "chai_raw_data", "Prime-Cam": "primecam_raw_data"}
# File type (and extension) each instrument writes.
FILE_TYPE_BY_INSTRUMENT = {"CHAI": "fits", "Prime-Cam": "g3"}

OBS_MODES = {
    "otf_map": "On-the-fly map: continuous scanning with periodic off positions.",
    "raster": "Raster map: grid of pointed positions.",
    "pointing": "Pointing cross on a bright compact source.",
    "ce_scan": "Constant-elevation scan across a survey strip.",
}

# name -> (species, transition, rest frequency in GHz)
LINES: dict[str, tuple[str, str, float | None]] = {
    "CO43": ("CO", "J=4-3", 461.0408),
    "CI10": ("[CI]", "3P1-3P0", 492.1607),
    "CO76": ("CO", "J=7-6", 806.6518),
    "CI21": ("[CI]", "3P2-3P1", 809.3420),
    "continuum": ("", "", None),
}

# short name -> (name, PI, sub-programmes {short name: name})
PROGRAMS: dict[str, tuple[str, str, dict[str, str]]] = {
    "GEco": (
        "Galactic Ecology",
        "GEco collaboration",
        {
            "orion": "Orion molecular cloud mapping",
            "galaxies": "Nearby galaxies",
            "evolved": "Evolved stars",
        },
    ),
    "Cal": ("Calibration", "Observatory staff", {}),
    "DSS": ("EoR-Spec Deep Spectroscopic Survey", "EoR-Spec collaboration", {}),
}

SOURCES: dict[str, dict[str, Any]] = {
    "Orion-KL": {"source_type": ST.FIXED, "ra_deg": 83.8097, "dec_deg": -5.3726},
    "IRC+10216": {"source_type": ST.FIXED, "ra_deg": 146.9892, "dec_deg": 13.2787},
    "NGC253": {"source_type": ST.FIXED, "ra_deg": 11.8880, "dec_deg": -25.2883},
    "M83": {"source_type": ST.FIXED, "ra_deg": 204.2538, "dec_deg": -29.8658},
    "Jupiter": {"source_type": ST.SOLAR_SYSTEM, "ephemeris_name": "jupiter"},
    "Mars": {"source_type": ST.SOLAR_SYSTEM, "ephemeris_name": "mars"},
    "E-CDFS strip": {
        "source_type": ST.CONSTANT_ELEVATION,
        "elevation_deg": 45.0,
        "az_min_deg": 120.0,
        "az_max_deg": 150.0,
    },
    "COSMOS strip": {
        "source_type": ST.CONSTANT_ELEVATION,
        "elevation_deg": 50.0,
        "az_min_deg": 60.0,
        "az_max_deg": 90.0,
    },
}

# name -> programme, sub-programme, source, mode, line, [(instrument, module, configuration)]
_CHAI_CO = [("CHAI", "LFA", "CO43"), ("CHAI", "HFA", "CO76")]
_CHAI_CI = [("CHAI", "LFA", "CI10"), ("CHAI", "HFA", "CI21")]
_PRIMECAM = [("Prime-Cam", "280 GHz", "wide"), ("Prime-Cam", "350 GHz", "wide")]
OBS_UNITS: dict[str, dict[str, Any]] = {
    "GEco-OrionKL-CO43-otf": {
        "program": "GEco", "sub": "orion", "source": "Orion-KL", "mode": "otf_map",
        "line": "CO43", "configs": _CHAI_CO, "priority": 10, "requested_time_s": 3600,
    },
    "GEco-NGC253-CI10-raster": {
        "program": "GEco", "sub": "galaxies", "source": "NGC253", "mode": "raster",
        "line": "CI10", "configs": _CHAI_CI, "priority": 5, "requested_time_s": 5400,
    },
    "GEco-M83-CO43-otf": {
        "program": "GEco", "sub": "galaxies", "source": "M83", "mode": "otf_map",
        "line": "CO43", "configs": _CHAI_CO, "priority": 5, "requested_time_s": 5400,
    },
    "GEco-IRC10216-CO76-raster": {
        "program": "GEco", "sub": "evolved", "source": "IRC+10216", "mode": "raster",
        "line": "CO76", "configs": _CHAI_CO, "priority": 3, "requested_time_s": 1800,
    },
    "Cal-Jupiter-CHAI-pointing": {
        "program": "Cal", "sub": None, "source": "Jupiter", "mode": "pointing",
        "line": "CO43", "configs": _CHAI_CO, "priority": 20, "requested_time_s": 300,
    },
    "Cal-Mars-PrimeCam-pointing": {
        "program": "Cal", "sub": None, "source": "Mars", "mode": "pointing",
        "line": "continuum", "configs": _PRIMECAM, "priority": 20, "requested_time_s": 300,
    },
    "DSS-ECDFS-ce": {
        "program": "DSS", "sub": None, "source": "E-CDFS strip", "mode": "ce_scan",
        "line": "continuum", "configs": _PRIMECAM, "priority": 8, "requested_time_s": 7200,
    },
    "DSS-COSMOS-ce": {
        "program": "DSS", "sub": None, "source": "COSMOS strip", "mode": "ce_scan",
        "line": "continuum", "configs": _PRIMECAM, "priority": 8, "requested_time_s": 7200,
    },
}  # fmt: skip

# Deletion (issue 10): the observatory keeps nothing once a package is archived, so a demo run
# frees its SOURCE and BUFFER; every other location keeps the model's default of a week.
DEMO_RETENTION: dict[tuple[str, str], timedelta] = {
    ("ccat", "chai_raw_data"): timedelta(0),
    ("ccat", "primecam_raw_data"): timedelta(0),
    ("ccat", "buffer"): timedelta(0),
}

# short name -> (name, geographic location, {location name: (type, priority)})
SITES: dict[str, tuple[str, str, dict[str, tuple[str, int]]]] = {
    "ccat": (
        "CCAT Observatory",
        "Atacama, Chile",
        {"chai_raw_data": (LT.SOURCE, 10), "primecam_raw_data": (LT.SOURCE, 10),
         "buffer": (LT.BUFFER, 10)},
    ),
    "cologne": (
        "University of Cologne",
        "Cologne, Germany",
        {"buffer": (LT.BUFFER, 10), "lta": (LT.LONG_TERM_ARCHIVE, 10),
         "processing": (LT.PROCESSING, 10)},
    ),
    "us": (
        "Cornell University",
        "Ithaca, USA",
        {"buffer": (LT.BUFFER, 10), "lta": (LT.LONG_TERM_ARCHIVE, 10),
         "processing": (LT.PROCESSING, 10)},
    ),
}  # fmt: skip

# Primary routes carry each package off the mountain once (round-robin over the two archive
# sites); secondary routes replicate between the archive sites. All go into the destination's
# buffer and are archived from there. name -> (origin, destination, primary)
ROUTES: dict[str, tuple[str, str, bool]] = {
    "ccat_to_cologne": ("ccat", "cologne", True),
    "ccat_to_us": ("ccat", "us", True),
    "cologne_to_us": ("cologne", "us", False),
    "us_to_cologne": ("us", "cologne", False),
}

# Registry keys of the reduction instruments (reduction.instruments); each gets a scientists group.
REDUCTION_INSTRUMENT_KEYS = ("chai", "primecam", "cncs")

# username -> (groups, is_staff, is_superuser)
USERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "viewer": ((access.VIEWERS,), False, False),
    "scientist": ((access.SCIENTISTS, access.instrument_group_name("chai")), False, False),
    "operator": ((access.OPERATORS,), True, False),
    "admin": ((), True, True),
}
ADMIN_USERNAME = "admin"
# username -> what the account is for, as `manage.py demo` lists the logins (access.py decides).
USER_ROLES: dict[str, str] = {
    "viewer": "viewer: reads every page, changes nothing",
    "scientist": "scientist of CHAI: also changes CHAI's reduction configuration",
    "operator": "operator: the admin site, the data path and every instrument",
    "admin": "superuser: everything, including users",
}


# --- Loading ------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Rows created, updated back to the definition, and found as defined, per model."""

    created: Counter[str] = field(default_factory=Counter)
    updated: Counter[str] = field(default_factory=Counter)
    present: Counter[str] = field(default_factory=Counter)
    # model label -> (singular, plural) for the summary line
    names: dict[str, tuple[str, str]] = field(default_factory=dict)

    def count(self, counter: Counter[str], model: type[models.Model]) -> None:
        label = model._meta.label
        self.names[label] = (str(model._meta.verbose_name), str(model._meta.verbose_name_plural))
        counter[label] += 1

    def summary(self) -> str:
        created, updated, present = (
            sum(c.values()) for c in (self.created, self.updated, self.present)
        )
        detail = ", ".join(
            f"{n} {self.names[label][0] if n == 1 else self.names[label][1]}"
            for label, n in sorted(self.created.items(), key=lambda item: self.names[item[0]])
        )
        return f"{created} created, {updated} updated, {present} already present" + (
            f" (new: {detail})" if detail else ""
        )


@dataclass
class DemoFacility:
    """What ``demo_facility_load`` did: the tally, the data root, and the users whose password
    was set by this run (the password is only meaningful for those)."""

    tally: Tally
    data_root: Path
    password: str
    passwords_set: list[str]

    def summary(self) -> str:
        return f"Demo facility: {self.tally.summary()}; data under {self.data_root}"


ModelT = TypeVar("ModelT", bound=models.Model)


def _ensure(
    model: type[ModelT], tally: Tally, *, lookup: dict[str, Any], values: dict[str, Any]
) -> ModelT:
    """Get the row by its natural key, creating it with ``values``; bring an existing row back
    to ``values`` only where it differs, so a second load writes nothing at all."""
    obj, created = model._default_manager.get_or_create(**lookup, defaults=values)
    if created:
        tally.count(tally.created, model)
        return obj
    changed = [name for name, value in values.items() if getattr(obj, name) != value]
    if not changed:
        tally.count(tally.present, model)
        return obj
    for name in changed:
        setattr(obj, name, values[name])
    if any(f.name == "updated_at" for f in model._meta.concrete_fields):
        changed.append("updated_at")
    obj.save(update_fields=changed)
    tally.count(tally.updated, model)
    return obj


def location_root(site: str, location: str) -> Path:
    """Where a demo disk location keeps its files."""
    return Path(settings.FACILITY_DATA_ROOT) / site / location


@transaction.atomic
def demo_facility_load(
    *, password: str = DEFAULT_PASSWORD, reset_passwords: bool = False
) -> DemoFacility:
    """Create or complete the demo facility. Idempotent; returns what it did.

    Creates the disk directories of every location. Sets ``password`` only on users it creates,
    or on every demo user with ``reset_passwords``.
    """
    tally = Tally()
    _load_observatory(tally)
    _load_sites(tally)
    _load_pipelines(tally)
    passwords_set = _load_users(tally, password=password, reset_passwords=reset_passwords)
    return DemoFacility(
        tally=tally,
        data_root=Path(settings.FACILITY_DATA_ROOT),
        password=password,
        passwords_set=passwords_set,
    )


def _load_observatory(tally: Tally) -> None:
    observatory = _ensure(
        Observatory,
        tally,
        lookup={"short_name": OBSERVATORY["short_name"]},
        values={k: v for k, v in OBSERVATORY.items() if k != "short_name"},
    )
    telescope = _ensure(
        Telescope,
        tally,
        lookup={"observatory": observatory, "name": TELESCOPE["name"]},
        values={k: v for k, v in TELESCOPE.items() if k != "name"},
    )
    configs: dict[tuple[str, str, str], InstrumentModuleConfiguration] = {}
    for instrument_name, spec in INSTRUMENTS.items():
        instrument = _ensure(
            Instrument,
            tally,
            lookup={"telescope": telescope, "name": instrument_name},
            values={
                "instrument_type": spec["instrument_type"],
                "description": spec["description"],
                "available": True,
            },
        )
        for module_name, module_spec in spec["modules"].items():
            module = _ensure(
                InstrumentModule,
                tally,
                lookup={"instrument": instrument, "name": module_name},
                values={k: v for k, v in module_spec.items() if k != "configurations"},
            )
            for config_name, config in module_spec["configurations"].items():
                configs[(instrument_name, module_name, config_name)] = _ensure(
                    InstrumentModuleConfiguration,
                    tally,
                    lookup={"instrument_module": module, "name": config_name},
                    values={"config": config},
                )

    modes = {
        name: _ensure(ObsMode, tally, lookup={"name": name}, values={"description": text})
        for name, text in OBS_MODES.items()
    }
    lines = {
        name: _ensure(
            Line,
            tally,
            lookup={"name": name},
            values={"species": species, "transition": trans, "rest_frequency_ghz": freq},
        )
        for name, (species, trans, freq) in LINES.items()
    }
    programs: dict[str, ObservingProgram] = {}
    subs: dict[tuple[str, str], SubObservingProgram] = {}
    for short, (name, pi, sub_programs) in PROGRAMS.items():
        programs[short] = _ensure(
            ObservingProgram,
            tally,
            lookup={"short_name": short},
            values={"name": name, "principal_investigator": pi},
        )
        for sub_short, sub_name in sub_programs.items():
            subs[(short, sub_short)] = _ensure(
                SubObservingProgram,
                tally,
                lookup={"observing_program": programs[short], "short_name": sub_short},
                values={"name": sub_name},
            )
    sources = {
        name: _ensure(Source, tally, lookup={"name": name}, values=dict(spec))
        for name, spec in SOURCES.items()
    }
    for name, spec in OBS_UNITS.items():
        obs_unit = _ensure(
            ObsUnit,
            tally,
            lookup={"name": name},
            values={
                "observing_program": programs[spec["program"]],
                "sub_observing_program": subs[(spec["program"], spec["sub"])]
                if spec["sub"]
                else None,
                "source": sources[spec["source"]],
                "obs_mode": modes[spec["mode"]],
                "line": lines[spec["line"]],
                "priority": spec["priority"],
                "requested_time_s": spec["requested_time_s"],
                "active": True,
            },
        )
        # set() only writes the difference, so a second load leaves the link table alone.
        obs_unit.instrument_module_configurations.set([configs[key] for key in spec["configs"]])


def _load_sites(tally: Tally) -> None:
    sites: dict[str, Site] = {}
    for short, (name, where, locations) in SITES.items():
        sites[short] = _ensure(
            Site, tally, lookup={"short_name": short}, values={"name": name, "location": where}
        )
        for location_name, (location_type, priority) in locations.items():
            root = location_root(short, location_name)
            root.mkdir(parents=True, exist_ok=True)
            _ensure(
                DataLocation,
                tally,
                lookup={"site": sites[short], "name": location_name},
                values={
                    "location_type": location_type,
                    "storage_type": DataLocation.StorageType.DISK,
                    "priority": priority,
                    "active": True,
                    "host": "",
                    "root_path": str(root),
                    "checksum_algorithm": settings.DEFAULT_CHECKSUM_ALGORITHM,
                    "retention_period": DEMO_RETENTION.get(
                        (short, location_name), timedelta(days=7)
                    ),
                },
            )
    for name, (origin, destination, primary) in ROUTES.items():
        _ensure(
            DataTransferRoute,
            tally,
            lookup={"name": name},
            values={
                "origin_site": sites[origin],
                "destination_site": sites[destination],
                "route_type": RT.BUFFERED,
                "is_primary": primary,
                "priority": 0,
                "active": True,
            },
        )


def _load_users(tally: Tally, *, password: str, reset_passwords: bool) -> list[str]:
    groups: dict[str, Group] = dict(access.ensure_groups())
    for key in REDUCTION_INSTRUMENT_KEYS:
        group = access.ensure_instrument_group(key)
        groups[group.name] = group
    user_model = get_user_model()
    passwords_set = []
    for username, (group_names, is_staff, is_superuser) in USERS.items():
        user = _ensure(
            user_model,
            tally,
            lookup={"username": username},
            values={
                "email": f"{username}@example.org",
                "is_staff": is_staff,
                "is_superuser": is_superuser,
                "is_active": True,
            },
        )
        # A user created by get_or_create has an empty (unusable-by-login) password.
        if reset_passwords or not user.password:
            user.set_password(password)
            user.save(update_fields=["password"])
            passwords_set.append(username)
        user.groups.add(*(groups[name] for name in group_names))
    return passwords_set


# --- Demo pipelines (issue 11, engine-runs) -----------------------------------------------------
# Two pipelines over the Prime-Cam scans the default simulation makes (`make demo`: three scans),
# one per module, each with two steps: "calibrate" per scan, then "combine" over every calibrated
# scan of a source. The steps run the demo reduction program (pipelines/demo/reduction, no
# Django) on the local backend without a container. The command names this interpreter: the
# program needs the project's environment (numpy, matplotlib), and a job inherits PATH, not the
# virtualenv activation.
DEMO_SOFTWARE: dict[str, tuple[str, str]] = {
    # name -> (description, subcommand of `python -m pipelines.demo.reduction`)
    "demo-calibrate": ("Demo reduction: per-scan calibration of raw detector data.", "calibrate"),
    "demo-combine": ("Demo reduction: combines calibrated scans of a source.", "combine"),
}
DEMO_SOFTWARE_VERSION = "1.0.0"
DEMO_STEP_CONFIGS: dict[str, dict[str, Any]] = {
    "demo-calibrate": {"calibration_mode": "hot_cold", "despike_sigma": 5.0},
    "demo-combine": {"weighting": "inverse_variance"},
}
# pipeline name -> (instrument, module, description)
DEMO_PIPELINES: dict[str, tuple[str, str, str]] = {
    "Prime-Cam 280 GHz maps": (
        "Prime-Cam", "280 GHz", "Calibrated 280 GHz scans, combined per source.",
    ),
    "Prime-Cam 350 GHz maps": (
        "Prime-Cam", "350 GHz", "Calibrated 350 GHz scans, combined per source.",
    ),
}  # fmt: skip
# Demo pipelines run at the first archive site's processing location.
DEMO_PROCESSING_SITE = "cologne"


def _load_pipelines(tally: Tally) -> None:
    import sys

    from pipelines.services.pipelines import reduction_step_set_dependencies

    versions: dict[str, ReductionSoftwareVersion] = {}
    for name, (description, subcommand) in DEMO_SOFTWARE.items():
        software = _ensure(
            ReductionSoftware, tally, lookup={"name": name}, values={"description": description}
        )
        versions[name] = _ensure(
            ReductionSoftwareVersion,
            tally,
            lookup={"software": software, "version": DEMO_SOFTWARE_VERSION},
            values={
                "image_ref": f"localhost/{name}:{DEMO_SOFTWARE_VERSION}",
                "command": [sys.executable, "-m", "pipelines.demo.reduction", subcommand],
                "is_active": True,
            },
        )
    configs = {
        name: _ensure(
            ReductionStepConfig, tally, lookup={"name": name}, values={"parameters": parameters}
        )
        for name, parameters in DEMO_STEP_CONFIGS.items()
    }
    processing = DataLocation.objects.get(
        site__short_name=DEMO_PROCESSING_SITE, location_type=LT.PROCESSING
    )
    for name, (instrument, module_name, description) in DEMO_PIPELINES.items():
        module = InstrumentModule.objects.get(instrument__name=instrument, name=module_name)
        grouping = _ensure(
            DataGrouping,
            tally,
            lookup={"name": f"{name}: archived packages"},
            values={
                "description": f"Archived {instrument} {module_name} packages.",
                "filter_rules": [
                    {
                        "table": "RawDataPackage",
                        "column": "state",
                        "operator": "eq",
                        "value": "archived",
                    }
                ],
                "instrument_module": module,
            },
        )
        pipeline = _ensure(
            Pipeline,
            tally,
            lookup={"name": name},
            values={
                "description": description,
                "data_grouping": grouping,
                "processing_location": processing,
                "trigger_type": TriggerType.CONTINUOUS,
                "trigger_config": {},
                "enabled": True,
            },
        )
        steps: dict[str, ReductionStep] = {}
        for order, (step_name, software_name, group_by) in enumerate(
            (
                ("calibrate", "demo-calibrate", ["executed_obs_unit"]),
                ("combine", "demo-combine", ["source"]),
            ),
            start=1,
        ):
            version = versions[software_name]
            steps[step_name] = _ensure(
                ReductionStep,
                tally,
                lookup={"pipeline": pipeline, "name": step_name},
                values={
                    "step_order": order,
                    "group_by": group_by,
                    # Every new scan is reduced at once (the demo has no batching to wait for).
                    "cooldown_seconds": 0,
                    "resource_requirements": {"cpu": 1, "memory_gb": 1, "time_hours": 0.5},
                    "max_retries": 2,
                    "software": version.software,
                    "software_version": version,
                    "version_policy": VersionPolicy.PINNED,
                    "config": configs[software_name],
                    # Calibration pins Prime-Cam's reduction parameters (the script in config/).
                    "reduction_instrument": "primecam" if step_name == "calibrate" else "",
                    # Combining reads the calibrated products only: no raw data staged for it.
                    "stages_raw_data": step_name == "calibrate",
                },
            )
        combine = steps["combine"]
        if set(combine.depends_on.all()) != {steps["calibrate"]}:
            reduction_step_set_dependencies(combine, [steps["calibrate"]])
