"""Pipelines and their steps: the DAG of ``ReductionStep.depends_on``.

``depends_on`` is a many-to-many, saved after the step row, so neither ``ReductionStep.clean``
nor a database constraint can see a new link before it exists. Every writer of links therefore
goes through ``reduction_step_set_dependencies`` (the admin form, the demo loader, tests), which
checks the proposed links against the saved graph of the pipeline under a lock on the pipeline
row: two concurrent edits that would each be fine alone but close a cycle together are
serialised, and the second one is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.core.exceptions import ValidationError
from django.db import transaction

from pipelines.models import Pipeline, ReductionStep

_Links = ReductionStep.depends_on.through


def _name(step: ReductionStep) -> str:
    return step.name or f"step {step.pk}"


def reduction_step_check_dependencies(
    step: ReductionStep, upstream: Iterable[ReductionStep]
) -> None:
    """Raise ValidationError (naming the steps) unless ``step`` may depend on exactly
    ``upstream``: every upstream step belongs to ``step.pipeline`` (as do the steps already
    depending on ``step``: moving a linked step to another pipeline is refused), none is
    ``step`` itself, and the pipeline's graph with ``step``'s links replaced by ``upstream``
    has no cycle. Reads the saved graph in two queries; writes nothing."""
    upstream = list(upstream)
    errors: list[str] = []
    for other in upstream:
        if step.pk is not None and other.pk == step.pk:
            errors.append(f"{_name(step)} cannot depend on itself")
        elif other.pipeline_id != step.pipeline_id:
            errors.append(
                f"{_name(step)} cannot depend on {other} of another pipeline: steps depend "
                "only on steps of their own pipeline"
            )
    if step.pk is not None:
        foreign = (
            ReductionStep.objects.filter(depends_on=step)
            .exclude(pipeline_id=step.pipeline_id)
            .select_related("pipeline")
        )
        errors.extend(
            f"{downstream} depends on {_name(step)}, so {_name(step)} cannot move to another "
            "pipeline"
            for downstream in foreign
        )
    if errors:
        raise ValidationError(errors)
    if step.pk is None:
        return  # nothing depends on an unsaved step yet, so it cannot close a cycle

    # Upstream links of every step of the pipeline, with ``step``'s replaced by the proposal.
    graph: dict[int, set[int]] = {}
    for downstream_id, upstream_id in _Links.objects.filter(
        from_reductionstep__pipeline_id=step.pipeline_id
    ).values_list("from_reductionstep_id", "to_reductionstep_id"):
        graph.setdefault(downstream_id, set()).add(upstream_id)
    graph[step.pk] = {other.pk for other in upstream}
    cycle = _find_cycle_through(step.pk, graph)
    if cycle:
        names = dict(
            ReductionStep.objects.filter(pk__in=cycle).values_list("pk", "name"),
        )
        names[step.pk] = _name(step)
        path = " -> ".join(names.get(pk, str(pk)) for pk in cycle)
        raise ValidationError(
            f"these dependencies would make a cycle: {path} (read '->' as 'depends on'); a "
            "pipeline's steps must form a DAG"
        )


def _find_cycle_through(start: int, graph: dict[int, set[int]]) -> list[int]:
    """A path ``start -> ... -> start`` following ``graph`` (step -> its upstream steps), or
    ``[]``. Iterative depth-first search: a pipeline of thousands of steps cannot overflow."""
    parents: dict[int, int] = {}
    stack = [start]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                chain = [node]  # node, its discoverer, ..., start
                while chain[-1] != start:
                    chain.append(parents[chain[-1]])
                return [*reversed(chain), start]
            if nxt not in seen:
                seen.add(nxt)
                parents[nxt] = node
                stack.append(nxt)
    return []


def reduction_step_set_dependencies(
    step: ReductionStep, upstream: Iterable[ReductionStep]
) -> ReductionStep:
    """Make ``step`` depend on exactly ``upstream`` (replacing its links), after
    ``reduction_step_check_dependencies``; on ValidationError nothing changes. Takes the
    pipeline row's lock so concurrent edits of one pipeline's graph are checked one after
    another. ``step`` must be saved. Returns ``step``."""
    if step.pk is None:
        raise ValidationError(f"save {_name(step)} before setting its dependencies")
    upstream = list(upstream)
    with transaction.atomic():
        list(Pipeline.objects.select_for_update().filter(pk=step.pipeline_id).values_list("pk"))
        reduction_step_check_dependencies(step, upstream)
        step.depends_on.set(upstream)
    return step
