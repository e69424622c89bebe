"""Operator pages. The dashboard grows with the UI issue; these are the entry points today."""

from __future__ import annotations

import logging

from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from pipelines.health import health_report
from pipelines.models import (
    ExecutedObsUnit,
    PackageState,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
)

log = logging.getLogger(__name__)


@login_required
def home(request: HttpRequest) -> HttpResponse:
    # One grouped query instead of one count per state (the table grows to millions of rows).
    per_state = dict(RawDataPackage.objects.order_by().values_list("state").annotate(n=Count("pk")))
    context = {
        "scans": ExecutedObsUnit.objects.count(),
        "files": RawDataFile.objects.count(),
        "packages_by_state": {
            label: per_state.get(value, 0) for value, label in PackageState.choices
        },
        "copies": PhysicalCopy.objects.count(),
        "recent_scans": ExecutedObsUnit.objects.select_related("obs_unit")[:10],
        # Where each package's tar is: the buffer it was written to (packaging manager).
        "recent_packages": RawDataPackage.objects.select_related(
            "instrument_module", "origin_location__site"
        ).order_by("-created_at", "-pk")[:20],
    }
    return render(request, "pipelines/home.html", context)


@never_cache
def health(request: HttpRequest) -> JsonResponse:
    """``pipelines.health.health_report``: 200 when the database, broker and cache answer, else
    503 naming which did not; each manager's last tick and lag, live workers, failed counts.

    Probes count any 2xx/3xx as healthy, so this URL is exempt from the HTTPS redirect
    (``SECURE_REDIRECT_EXEMPT`` in settings) and the response is never cached. Public (no
    login, for load balancers): a failure is reported as ``"error"`` only; the driver's message,
    which may name hosts, ports and users, goes to the log.
    """
    status, body = health_report()
    return JsonResponse(body, status=status)
