"""factory-boy factories for every model. Each builds a valid row with valid parents."""

from __future__ import annotations

import hashlib
import uuid

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone
from factory.django import DjangoModelFactory

from pipelines import models as m
from reduction import models as rm


def _sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


class UserFactory(DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.org")
    password = factory.django.Password("correct horse battery staple")


class GroupFactory(DjangoModelFactory):
    class Meta:
        model = Group
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"group{n}")


# --- Observatory ---------------------------------------------------------------------------------
class ObservatoryFactory(DjangoModelFactory):
    class Meta:
        model = m.Observatory

    name = factory.Sequence(lambda n: f"Observatory {n}")
    short_name = factory.Sequence(lambda n: f"obs{n}")


class TelescopeFactory(DjangoModelFactory):
    class Meta:
        model = m.Telescope

    observatory = factory.SubFactory(ObservatoryFactory)
    name = factory.Sequence(lambda n: f"Telescope {n}")


class InstrumentFactory(DjangoModelFactory):
    class Meta:
        model = m.Instrument

    telescope = factory.SubFactory(TelescopeFactory)
    name = factory.Sequence(lambda n: f"Instrument {n}")
    instrument_type = "heterodyne"


class InstrumentModuleFactory(DjangoModelFactory):
    class Meta:
        model = m.InstrumentModule

    instrument = factory.SubFactory(InstrumentFactory)
    name = factory.Sequence(lambda n: f"module{n}")
    pixels = 64
    freq_min_ghz = 455.0
    freq_max_ghz = 495.0


class InstrumentModuleConfigurationFactory(DjangoModelFactory):
    class Meta:
        model = m.InstrumentModuleConfiguration

    instrument_module = factory.SubFactory(InstrumentModuleFactory)
    name = factory.Sequence(lambda n: f"config{n}")
    config = factory.LazyFunction(lambda: {"lo_ghz": 461.04})


class ObservingProgramFactory(DjangoModelFactory):
    class Meta:
        model = m.ObservingProgram

    name = factory.Sequence(lambda n: f"Programme {n}")
    short_name = factory.Sequence(lambda n: f"prog{n}")


class SubObservingProgramFactory(DjangoModelFactory):
    class Meta:
        model = m.SubObservingProgram

    observing_program = factory.SubFactory(ObservingProgramFactory)
    name = factory.Sequence(lambda n: f"Sub-programme {n}")
    short_name = factory.Sequence(lambda n: f"sub{n}")


class SourceFactory(DjangoModelFactory):
    class Meta:
        model = m.Source

    name = factory.Sequence(lambda n: f"Source {n}")
    source_type = m.Source.SourceType.FIXED
    ra_deg = 83.82
    dec_deg = -5.39


class ObsModeFactory(DjangoModelFactory):
    class Meta:
        model = m.ObsMode

    name = factory.Sequence(lambda n: f"otf{n}")


class LineFactory(DjangoModelFactory):
    class Meta:
        model = m.Line

    name = factory.Sequence(lambda n: f"LINE{n}")
    rest_frequency_ghz = 461.04


class ObsUnitFactory(DjangoModelFactory):
    class Meta:
        model = m.ObsUnit

    name = factory.Sequence(lambda n: f"obs-unit-{n}")
    observing_program = factory.SubFactory(ObservingProgramFactory)
    source = factory.SubFactory(SourceFactory)
    obs_mode = factory.SubFactory(ObsModeFactory)
    line = factory.SubFactory(LineFactory)


class ExecutedObsUnitFactory(DjangoModelFactory):
    class Meta:
        model = m.ExecutedObsUnit

    obs_unit = factory.SubFactory(ObsUnitFactory)
    start_time = factory.LazyFunction(timezone.now)


# --- Locations -----------------------------------------------------------------------------------
class SiteFactory(DjangoModelFactory):
    class Meta:
        model = m.Site
        django_get_or_create = ("short_name",)

    name = factory.Sequence(lambda n: f"Site {n}")
    short_name = factory.Sequence(lambda n: f"site{n}")


class DataLocationFactory(DjangoModelFactory):
    class Meta:
        model = m.DataLocation

    site = factory.SubFactory(SiteFactory)
    name = factory.Sequence(lambda n: f"loc{n}")
    location_type = m.DataLocation.LocationType.BUFFER
    storage_type = m.DataLocation.StorageType.DISK
    root_path = factory.Sequence(lambda n: f"/tmp/workflow-test/loc{n}")


# --- Files ---------------------------------------------------------------------------------------
class RawDataFileFactory(DjangoModelFactory):
    class Meta:
        model = m.RawDataFile

    id = factory.LazyFunction(uuid.uuid4)
    name = factory.Sequence(lambda n: f"scan_{n:05d}.fits")
    relative_path = factory.LazyAttribute(lambda o: f"raw/{o.name}")
    size = 1024
    checksum = factory.Sequence(_sha)
    executed_obs_unit = factory.SubFactory(ExecutedObsUnitFactory)
    instrument_module = factory.SubFactory(InstrumentModuleFactory)
    source_location = factory.SubFactory(
        DataLocationFactory, location_type=m.DataLocation.LocationType.SOURCE
    )


class RawDataPackageFactory(DjangoModelFactory):
    class Meta:
        model = m.RawDataPackage

    name = factory.Sequence(lambda n: f"package_{n:06d}.tar")
    relative_path = factory.LazyAttribute(lambda o: f"packages/{o.name}")
    executed_obs_unit = factory.SubFactory(ExecutedObsUnitFactory)
    instrument_module = factory.SubFactory(InstrumentModuleFactory)
    size = 4096
    file_count = 4
    checksum = factory.Sequence(_sha)


class DataTransferPackageFactory(DjangoModelFactory):
    class Meta:
        model = m.DataTransferPackage

    name = factory.Sequence(lambda n: f"bundle_{n:06d}.tar")
    relative_path = factory.LazyAttribute(lambda o: f"bundles/{o.name}")
    origin_location = factory.SubFactory(DataLocationFactory)
    size = 8192
    checksum = factory.Sequence(_sha)


class PhysicalCopyFactory(DjangoModelFactory):
    """A package copy by default; pass ``raw_data_file=...`` with ``kind=...`` for other kinds."""

    class Meta:
        model = m.PhysicalCopy

    kind = m.PhysicalCopy.Kind.RAW_DATA_PACKAGE
    raw_data_package = factory.SubFactory(RawDataPackageFactory)
    location = factory.SubFactory(DataLocationFactory)
    relative_path = factory.LazyAttribute(
        lambda o: o.raw_data_package.relative_path if o.raw_data_package else "copy"
    )


class EventFactory(DjangoModelFactory):
    class Meta:
        model = m.StateEvent

    entity = "raw_data_package"
    object_id = factory.Sequence(str)
    field = "status"
    from_state = "pending"
    to_state = "scheduled"
    actor = "test"


# --- Operations ----------------------------------------------------------------------------------
class DataTransferRouteFactory(DjangoModelFactory):
    class Meta:
        model = m.DataTransferRoute

    name = factory.Sequence(lambda n: f"route{n}")
    origin_site = factory.SubFactory(SiteFactory)
    destination_site = factory.SubFactory(SiteFactory)


class DataTransferFactory(DjangoModelFactory):
    class Meta:
        model = m.DataTransfer

    data_transfer_package = factory.SubFactory(DataTransferPackageFactory)
    origin_location = factory.SelfAttribute("data_transfer_package.origin_location")
    destination_location = factory.SubFactory(DataLocationFactory)
    # Secondary by default: a bundle has one live primary transfer (a database constraint), and
    # tests often make several transfers of one bundle.
    is_primary = False


class PrimaryTransferCursorFactory(DjangoModelFactory):
    class Meta:
        model = m.PrimaryTransferCursor

    origin_site = factory.SubFactory(SiteFactory)
    last_route = factory.SubFactory(
        DataTransferRouteFactory,
        origin_site=factory.SelfAttribute("..origin_site"),
        is_primary=True,
    )


class DataTransferLogFactory(DjangoModelFactory):
    class Meta:
        model = m.DataTransferLog

    data_transfer = factory.SubFactory(DataTransferFactory)
    message = "copied"
    log_path = "/var/log/workflow/transfer.log"


class LongTermArchiveTransferFactory(DjangoModelFactory):
    class Meta:
        model = m.LongTermArchiveTransfer

    raw_data_package = factory.SubFactory(RawDataPackageFactory)
    origin_location = factory.SubFactory(DataLocationFactory)
    destination_location = factory.SubFactory(
        DataLocationFactory, location_type=m.DataLocation.LocationType.LONG_TERM_ARCHIVE
    )


class StagingJobFactory(DjangoModelFactory):
    class Meta:
        model = m.StagingJob

    destination_location = factory.SubFactory(
        DataLocationFactory, location_type=m.DataLocation.LocationType.PROCESSING
    )


class DeletionTaskFactory(DjangoModelFactory):
    class Meta:
        model = m.DeletionTask

    physical_copy = factory.SubFactory(PhysicalCopyFactory)
    reason = "buffer copy: package archived with 1 verified archive copy"


class DataLocationUsageFactory(DjangoModelFactory):
    class Meta:
        model = m.DataLocationUsage

    location = factory.SubFactory(DataLocationFactory)
    measured_at = factory.LazyFunction(timezone.now)
    used_bytes = 3 * 1024**3
    free_bytes = 7 * 1024**3
    total_bytes = 10 * 1024**3


class DarkFileFactory(DjangoModelFactory):
    class Meta:
        model = m.DarkFile

    location = factory.SubFactory(DataLocationFactory)
    relative_path = factory.Sequence(lambda n: f"stray/unknown-{n}.dat")
    size_bytes = 1234
    first_seen_at = factory.LazyFunction(timezone.now)
    last_seen_at = factory.LazyFunction(timezone.now)


class CopyRepairFactory(DjangoModelFactory):
    class Meta:
        model = m.CopyRepair

    physical_copy = factory.SubFactory(
        PhysicalCopyFactory, integrity=m.PhysicalCopy.Integrity.MISMATCH
    )
    reason = "checksum mismatch found by the integrity manager"


# --- Workflow ------------------------------------------------------------------------------------
class ReductionSoftwareFactory(DjangoModelFactory):
    class Meta:
        model = m.ReductionSoftware

    name = factory.Sequence(lambda n: f"software-{n}")


class ReductionSoftwareVersionFactory(DjangoModelFactory):
    class Meta:
        model = m.ReductionSoftwareVersion

    software = factory.SubFactory(ReductionSoftwareFactory)
    version = factory.Sequence(lambda n: f"1.{n}.0")
    image_ref = factory.LazyAttribute(
        lambda o: f"registry.example.org/{o.software.name}:{o.version}"
    )


class ReductionStepConfigFactory(DjangoModelFactory):
    class Meta:
        model = m.ReductionStepConfig

    name = factory.Sequence(lambda n: f"config-{n}")
    parameters = factory.LazyFunction(lambda: {"calibration_mode": "hot_cold"})


class DataGroupingFactory(DjangoModelFactory):
    class Meta:
        model = m.DataGrouping

    name = factory.Sequence(lambda n: f"grouping-{n}")
    filter_rules = factory.LazyFunction(
        lambda: [
            {"table": "RawDataPackage", "column": "state", "operator": "eq", "value": "archived"}
        ]
    )


class PipelineFactory(DjangoModelFactory):
    class Meta:
        model = m.Pipeline

    name = factory.Sequence(lambda n: f"pipeline-{n}")
    data_grouping = factory.SubFactory(DataGroupingFactory)
    processing_location = factory.SubFactory(
        DataLocationFactory, location_type=m.DataLocation.LocationType.PROCESSING
    )


class ReductionStepFactory(DjangoModelFactory):
    class Meta:
        model = m.ReductionStep

    pipeline = factory.SubFactory(PipelineFactory)
    name = factory.Sequence(lambda n: f"step{n}")
    step_order = factory.Sequence(int)
    software = factory.SubFactory(ReductionSoftwareFactory)
    group_by = factory.LazyFunction(lambda: ["executed_obs_unit"])


class ExecutedReductionStepFactory(DjangoModelFactory):
    class Meta:
        model = m.ExecutedReductionStep

    reduction_step = factory.SubFactory(ReductionStepFactory)
    sub_group_key = factory.Sequence(lambda n: f"scan-{n}")


class DataProductFactory(DjangoModelFactory):
    class Meta:
        model = m.DataProduct

    produced_by = factory.SubFactory(ExecutedReductionStepFactory)
    product_type = m.DataProductType.SCIENCE
    filename = factory.Sequence(lambda n: f"cube_{n}.fits")
    relative_path = factory.LazyAttribute(lambda o: f"science/{o.filename}")
    size_bytes = 2048
    checksum = factory.Sequence(_sha)


# --- Reduction configuration ---------------------------------------------------------------------
class ReductionPropertyFactory(DjangoModelFactory):
    class Meta:
        model = rm.ReductionProperty

    instrument = "cncs"
    key = factory.Sequence(lambda n: f"param_{n}")
    value = 1


class ParameterSetFactory(DjangoModelFactory):
    class Meta:
        model = rm.ParameterSet

    instrument = "cncs"
    number = factory.Sequence(lambda n: n + 1)
    values = factory.LazyFunction(lambda: {"vanadium_file": "/SNS/CNCS/van_12345.nxs"})


class PropertyModificationFactory(DjangoModelFactory):
    class Meta:
        model = rm.PropertyModification

    property = factory.SubFactory(ReductionPropertyFactory)
    old_value = 1
    new_value = 2


class ReductionConfigLockFactory(DjangoModelFactory):
    class Meta:
        model = rm.ReductionConfigLock
        django_get_or_create = ("instrument",)

    instrument = factory.Sequence(lambda n: f"instrument{n}")


# --- Campaigns (issue 12) -------------------------------------------------------------------------
class CampaignFactory(DjangoModelFactory):
    class Meta:
        model = m.Campaign

    kind = m.CampaignKind.BACKFILL
    parameters = factory.Sequence(lambda n: {"pipeline": f"pipeline-{n}", "mode": "all"})
    parameters_key = factory.Sequence(lambda n: f"{n:064x}")
    max_active = 5
    requested_by = "command:backfill by test"
