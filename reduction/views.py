"""Reduction configuration pages: one generic set of views for every registered instrument.

Everyone logged in may view; saving, resetting (every POST that changes something) needs
``can_change_instrument`` and answers 403 otherwise. Views check access, bind the form, call one
service and render or redirect.
"""

from __future__ import annotations

import json
from typing import Any, cast

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from access import can_change_instrument, instrument_group_name
from reduction.errors import InvalidParameters, ReductionConfigError
from reduction.forms import ReductionForm, errors_as_dict
from reduction.instruments import UnknownInstrument, all_instruments, get_instrument
from reduction.instruments.base import Instrument
from reduction.models import ParameterSet, PropertyModification
from reduction.rendering import checksum
from reduction.services import (
    COMMENT_MAX_LENGTH,
    ConfigWriteResult,
    reduction_config_current,
    reduction_config_diff,
    reduction_config_preview,
    reduction_config_reset,
    reduction_config_update,
)


def _instrument_or_404(key: str) -> Instrument:
    try:
        return get_instrument(key)
    except UnknownInstrument:
        raise Http404(f"no reduction configuration for instrument {key!r}") from None


def _require_change(request: HttpRequest, instrument: Instrument) -> User:
    """The user making the change, or PermissionDenied (403) if they may not."""
    if not can_change_instrument(request.user, instrument.key):
        raise PermissionDenied(
            f"only operators and members of {instrument_group_name(instrument.key)} may change "
            f"the {instrument.label} configuration"
        )
    return cast(User, request.user)


def _confirm(request: HttpRequest, instrument: Instrument, result: ConfigWriteResult) -> None:
    ps = result.parameter_set
    if result.created:
        changed = ", ".join(result.changed_keys) or (
            "none from the defaults" if ps.number == 1 else "script only"
        )
        text = f"Saved {instrument.label} version {ps.number} (changed: {changed})."
    else:
        text = f"No changes: version {ps.number} is current."
    messages.success(request, f"{text} Wrote {result.path} · sha256 {result.checksum}")


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    rows = []
    for instrument in all_instruments():
        rows.append(
            {
                "instrument": instrument,
                "latest": ParameterSet.objects.latest_for(instrument.key),
                "can_change": can_change_instrument(request.user, instrument.key),
            }
        )
    return render(request, "reduction/index.html", {"rows": rows})


@login_required
@require_http_methods(["GET", "POST"])
def configure(request: HttpRequest, key: str) -> HttpResponse:
    instrument = _instrument_or_404(key)
    can_change = can_change_instrument(request.user, key)
    error = ""
    comment_errors: list[str] = []
    form: ReductionForm
    if request.method == "POST":
        author = _require_change(request, instrument)
        form = instrument.form_class(request.POST)
        comment = request.POST.get("comment", "")
        if form.is_valid():
            try:
                result = reduction_config_update(
                    key, values=form.cleaned_values(), user=author, comment=comment
                )
            except InvalidParameters as exc:
                for name, field_errors in exc.errors.items():
                    if name == "comment":
                        comment_errors.extend(field_errors)
                        continue
                    for message in field_errors:
                        form.add_error(name if name in form.fields else None, message)
                error = "Not saved: some values are invalid (see the fields marked below)."
            except ReductionConfigError as exc:
                error = f"Not saved, nothing changed: {exc}"
            else:
                _confirm(request, instrument, result)
                return redirect("reduction:configure", key=key)
        else:
            error = "Not saved: some values are invalid (see the fields marked below)."
    else:
        form = instrument.form_class(initial=reduction_config_current(key))
        comment = ""
    if not can_change:
        for field in form.fields.values():
            field.disabled = True
    latest = ParameterSet.objects.latest_for(key)
    script_state = _script_state(instrument, latest)
    return render(
        request,
        "reduction/configure.html",
        {
            "instrument": instrument,
            "form": form,
            "can_change": can_change,
            "group_name": instrument_group_name(key),
            "latest": latest,
            "comment": comment,
            "comment_errors": comment_errors,
            "comment_max_length": COMMENT_MAX_LENGTH,
            "error": error,
            "script_state": script_state,
        },
    )


def _script_state(instrument: Instrument, latest: ParameterSet | None) -> dict[str, Any]:
    """Whether the installed script is the latest version's (someone may have edited it)."""
    path = instrument.script_path()
    try:
        on_disk = path.read_text(encoding="utf-8")
    except OSError:
        return {"path": path, "present": False, "matches": False}
    return {
        "path": path,
        "present": True,
        "matches": latest is not None and checksum(on_disk) == latest.script_checksum,
    }


# What the page's script shows when the preview cannot even start; it clears the old preview.
SESSION_EXPIRED = "Your session has expired: log in again (reload the page) to preview."
PAGE_OUT_OF_DATE = "The page is out of date: reload it to preview (unsaved changes are lost)."


def _csrf_rejected(request: HttpRequest) -> bool:
    """Whether Django's CSRF check refuses ``request`` (the same check the middleware makes)."""

    # A view that is not csrf_exempt (the middleware skips exempt ones, as this view is).
    def checked_view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    middleware = CsrfViewMiddleware(checked_view)
    return middleware.process_view(request, checked_view, (), {}) is not None


# The page's script calls this with fetch and reads JSON, so the refusals a browser page would get
# as HTML (the login redirect, the CSRF failure page) are JSON errors here: 401 and 403.
@csrf_exempt
@require_POST
def preview(request: HttpRequest, key: str) -> JsonResponse:
    """The script the submitted values would produce, and its diff against the latest version.
    Writes nothing, so any logged-in user may ask; answers 400 with per-field errors, 422 with
    the template error, 401 (``"error": SESSION_EXPIRED``) when not logged in and 403
    (``PAGE_OUT_OF_DATE``) when the CSRF token is missing or stale."""
    if not request.user.is_authenticated:
        return JsonResponse({"ok": False, "error": SESSION_EXPIRED, "reason": "login"}, status=401)
    if _csrf_rejected(request):
        return JsonResponse({"ok": False, "error": PAGE_OUT_OF_DATE, "reason": "csrf"}, status=403)
    instrument = _instrument_or_404(key)
    form = instrument.form_class(request.POST)
    if not form.is_valid():
        return JsonResponse({"ok": False, "errors": errors_as_dict(form)}, status=400)
    try:
        preview = reduction_config_preview(key, form.cleaned_values())
    except InvalidParameters as exc:
        return JsonResponse({"ok": False, "errors": exc.errors}, status=400)
    except ReductionConfigError as exc:
        return JsonResponse({"ok": False, "error": str(exc)}, status=422)
    return JsonResponse(
        {
            "ok": True,
            "script": preview.script,
            "checksum": preview.checksum,
            "version": preview.version,
            "against": preview.against.number if preview.against else None,
            "diff": [{"text": line, "kind": _line_kind(line)} for line in preview.diff_lines],
        }
    )


def _line_kind(line: str) -> str:
    """CSS class of a unified-diff line."""
    if line.startswith(("---", "+++", "@@")):
        return "meta"
    if line.startswith("+"):
        return "add"
    if line.startswith("-"):
        return "del"
    return "same"


@login_required
@require_POST
def reset(request: HttpRequest, key: str) -> HttpResponse:
    instrument = _instrument_or_404(key)
    author = _require_change(request, instrument)
    comment = request.POST.get("comment", "")
    try:
        result = reduction_config_reset(key, user=author, comment=comment)
    except ReductionConfigError as exc:
        messages.error(request, f"Reset failed, nothing changed: {exc}")
    else:
        _confirm(request, instrument, result)
    return redirect("reduction:configure", key=key)


@login_required
@require_GET
def history(request: HttpRequest, key: str) -> HttpResponse:
    instrument = _instrument_or_404(key)
    versions = (
        ParameterSet.objects.for_instrument(key)
        .select_related("author")
        .prefetch_related(
            Prefetch(
                "modifications",
                queryset=PropertyModification.objects.select_related("property").order_by("id"),
            )
        )
        .order_by("-number")
    )
    page = Paginator(versions, 50).get_page(request.GET.get("page"))
    return render(
        request,
        "reduction/history.html",
        {"instrument": instrument, "page": page, "versions": page.object_list},
    )


def _pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@login_required
@require_GET
def diff(request: HttpRequest, key: str) -> HttpResponse:
    instrument = _instrument_or_404(key)
    try:
        a, b = int(request.GET["a"]), int(request.GET["b"])
    except (KeyError, ValueError):
        raise Http404("choose two versions: ?a=<number>&b=<number>") from None
    old = get_object_or_404(ParameterSet, instrument=key, number=min(a, b))
    new = get_object_or_404(ParameterSet, instrument=key, number=max(a, b))
    result = reduction_config_diff(old, new)
    rows = [
        {"key": c.key, "old": _pretty(c.old), "new": _pretty(c.new), "changed": c.changed}
        for c in result.values
    ]
    lines = [{"text": line, "kind": _line_kind(line)} for line in result.script_lines]
    return render(
        request,
        "reduction/diff.html",
        {
            "instrument": instrument,
            "old": old,
            "new": new,
            "rows": rows,
            "changed_count": len(result.changed_values),
            "lines": lines,
        },
    )
