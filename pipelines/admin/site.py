"""The admin index and sidebar grouped by topic instead of one alphabetical list per app.

``TOPICS`` is the literal registry: topic title -> model labels, in the order an operator follows
the data. Models of other apps (users, beat schedules, the reduction app) keep Django's grouping
by app, after the topics. tests/pipelines/test_admin_wording.py fails when a registered
``pipelines`` model is in no topic, so a new model has to be placed here.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse

TOPICS: dict[str, tuple[str, ...]] = {
    "Observatory": (
        "pipelines.Observatory",
        "pipelines.Telescope",
        "pipelines.Instrument",
        "pipelines.InstrumentModule",
        "pipelines.InstrumentModuleConfiguration",
        "pipelines.ObservingProgram",
        "pipelines.SubObservingProgram",
        "pipelines.Source",
        "pipelines.ObsMode",
        "pipelines.Line",
        "pipelines.ObsUnit",
        "pipelines.ExecutedObsUnit",
    ),
    "Data": (
        "pipelines.RawDataFile",
        "pipelines.RawDataPackage",
        "pipelines.DataTransferPackage",
    ),
    "Locations": (
        "pipelines.Site",
        "pipelines.DataLocation",
        "pipelines.PhysicalCopy",
    ),
    "Transfers": (
        "pipelines.DataTransferRoute",
        "pipelines.PrimaryTransferCursor",
        "pipelines.DataTransfer",
        "pipelines.DataTransferLog",
        "pipelines.LongTermArchiveTransfer",
        "pipelines.StagingJob",
    ),
    "Safety": (
        "pipelines.DeletionTask",
        "pipelines.CopyRepair",
        "pipelines.DataLocationUsage",
        "pipelines.DarkFile",
    ),
    "Workflow": (
        "pipelines.ReductionSoftware",
        "pipelines.ReductionSoftwareVersion",
        "pipelines.ReductionStepConfig",
        "pipelines.DataGrouping",
        "pipelines.Pipeline",
        "pipelines.ReductionStep",
        "pipelines.ExecutedReductionStep",
        "pipelines.DataProduct",
        "pipelines.Campaign",  # backfills and reprocessing (issue 12)
    ),
    "Audit": ("pipelines.StateEvent",),
}

# Apps whose models are shown by topic; other apps keep their own group.
TOPIC_APPS = {label.split(".")[0] for labels in TOPICS.values() for label in labels}


def _reduction_pages_entry() -> dict[str, Any]:
    """A row of the reduction group linking the per-instrument configuration pages, which are
    views of their own rather than an admin model."""
    return {
        "name": "Instrument configuration pages",
        "object_name": "ReductionPages",
        "admin_url": reverse("reduction:index"),
        "add_url": None,
        "view_only": True,
        "perms": {"view": True},
    }


def grouped_app_list(
    site: admin.AdminSite, request: HttpRequest, app_label: str | None = None
) -> list[dict[str, Any]]:
    """``AdminSite.get_app_list`` by topic: one group per ``TOPICS`` entry holding the models
    the user may see (empty groups left out), then the other apps as Django groups them (and
    models of the topic apps that ``TOPICS`` does not place yet). An app's
    own index page (``app_label`` given) keeps Django's list of that app."""
    if app_label is not None:
        return admin.AdminSite.get_app_list(site, request, app_label)
    apps = admin.AdminSite.get_app_list(site, request)
    by_label = {
        entry["model"]._meta.label: (app, entry)
        for app in apps
        if app["app_label"] in TOPIC_APPS
        for entry in app["models"]
    }
    groups = []
    for title, labels in TOPICS.items():
        found = [by_label[label] for label in labels if label in by_label]
        if not found:
            continue
        app = found[0][0]
        groups.append(
            {
                **app,
                "name": title,
                # Keeps the CSS classes and element ids of the templates unique per group.
                "app_label": f"{app['app_label']}-{title.lower()}",
                "models": [entry for _, entry in found],
            }
        )
    # A model not placed in TOPICS yet still shows, under its app's own name.
    placed = {label for labels in TOPICS.values() for label in labels}
    others = []
    for app in apps:
        if app["app_label"] in TOPIC_APPS:
            rest = [e for e in app["models"] if e["model"]._meta.label not in placed]
            if rest:
                others.append({**app, "models": rest})
        if app["app_label"] in TOPIC_APPS:
            continue
        if app["app_label"] == "reduction":
            app = {**app, "models": [_reduction_pages_entry(), *app["models"]]}
        others.append(app)
    return groups + others


def install(site: admin.AdminSite) -> None:
    """Group ``site``'s index and sidebar by topic. The project keeps Django's default site
    (``admin.site``, made by ``django.contrib.admin`` in INSTALLED_APPS), so the one method is
    replaced on that instance instead of configuring a site subclass."""
    site.get_app_list = lambda request, app_label=None: grouped_app_list(  # type: ignore[method-assign]
        site, request, app_label
    )
