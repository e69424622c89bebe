"""The trigger manager (workflow manager §4.2): find the gaps of every step and create PENDING runs.

Semantics (the brief's PROPOSED ones, made exact here; ``explain_step`` answers in these words):

- **Which data.** A pipeline's packages are its grouping's (``grouping_queryset``). When the
  grouping's rules say nothing about ``RawDataPackage.state``, only ARCHIVED packages count (data
  that is not in an archive yet cannot be staged); rules that name ``state`` decide themselves.
- **Sub-groups.** Each step splits those packages by its own ``group_by``
  (``package_sub_groups``); a run belongs to one (step, ``sub_group_key``).
- **Gap.** The packages of a sub-group that are not an input of any run of that (step,
  sub-group), whatever the run's state: COMPLETED, active, CANCELLED, FAILED for good and
  FAILED awaiting its retry all cover their inputs. So only new packages reopen a sub-group (a
  cancelled run is not re-created at the next tick), and a new run then takes ALL current
  packages of the sub-group (a combined product must be made from everything).
- **Occupied.** No run is created while the (step, sub-group) has an active run or a FAILED one
  awaiting its retry; the database refuses it anyway (``executed_reduction_step_one_active_per_
  subgroup``): each run is inserted in its own savepoint and a constraint loser is skipped, so an
  ``IntegrityError`` never leaves a tick.
- **Cooldown.** A new run needs ``now - created_at`` of the last run of the (step, sub-group) to
  be at least ``cooldown_seconds`` (reading (a) of the brief: runs are at least N seconds apart).
- **Upstream.** For a step with ``depends_on``, a package is *eligible* when, for every upstream
  step, the latest run that took it as input COMPLETED; the products of those runs become the new
  run's ``input_products``. A package whose latest upstream run failed for good or was cancelled
  is *excluded*: left out and listed in ``run.excluded_inputs`` (the manifest repeats it). A
  package whose upstream run is still in progress (or FAILED awaiting a retry) makes the whole
  sub-group *wait*, so a combined step runs once over all of its scans instead of once per
  finished scan; a package with no upstream run yet does not block (it reopens the sub-group
  when its upstream run completes). The gap of a downstream step is its eligible packages not
  yet covered. The price: a fan-in step whose upstream always has a run in progress (data
  arriving faster than it is reduced) waits until the upstream is quiet; ``explain_step``
  names the run it waits for.
- **Trigger types gate root steps only** (steps without ``depends_on``): CONTINUOUS at every
  evaluation, CRON only once per due time of ``trigger_config["cron"]`` (croniter;
  ``Pipeline.cron_last_due_at`` is advanced by a conditional UPDATE, so of several managers
  exactly one evaluates each due time), MANUAL only through ``pipeline_trigger``. Downstream
  steps follow their completed upstream runs in every mode, so a triggered DAG runs to its end.
- **Where and whether.** Only enabled pipelines of this instance's processing location
  (``processing_location_id()``) are evaluated, by descending priority.
- **Incremental.** A tick looks at packages archived after ``Pipeline.trigger_watermark``, at
  upstream runs completed since it and at sub-groups whose cooldown ended since it; every
  ``WORKFLOW_TRIGGER_FULL_INTERVAL`` seconds a pipeline is re-evaluated in full (the safety net
  for anything the increments cannot see, e.g. a package archived by a transaction that
  committed long after it stamped ``archived_at``, or rules over other columns that changed),
  in batches of pipelines, while the tick has used less than half its interval.
- **Manual.** ``pipeline_trigger`` creates the runs of a pipeline's root steps now (any
  trigger type, cooldown ignored, the gap respected); a disabled pipeline or an unknown
  sub-group key is refused with ``TriggerError`` and nothing is created.

Modules: ``gap.py`` reads and decides (no writes), ``manager.py`` creates runs and ticks,
``why.py`` words the decisions for ``manage.py why``.
"""

from .creation import run_config_snapshot, step_software_version
from .gap import (
    Decision,
    Reason,
    RunInfo,
    pipeline_packages,
    processing_location_id,
    served_pipelines,
    step_gap,
)
from .manager import (
    QUEUED_KEY,
    WATERMARK_LAG,
    TriggerError,
    cron_next_due,
    pipeline_evaluate,
    pipeline_trigger,
    queue_trigger_evaluation,
    trigger_evaluate_downstream,
    trigger_evaluate_now,
    trigger_manager_tick,
)
from .why import explain_step

__all__ = [
    "QUEUED_KEY",
    "WATERMARK_LAG",
    "Decision",
    "Reason",
    "RunInfo",
    "TriggerError",
    "cron_next_due",
    "explain_step",
    "pipeline_evaluate",
    "pipeline_packages",
    "pipeline_trigger",
    "processing_location_id",
    "queue_trigger_evaluation",
    "run_config_snapshot",
    "served_pipelines",
    "step_gap",
    "step_software_version",
    "trigger_evaluate_downstream",
    "trigger_evaluate_now",
    "trigger_manager_tick",
]
