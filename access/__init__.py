"""Who may do what: three roles as Django groups, plus per-instrument scientist groups.

A top-level package, not part of either app, because both use it: the reduction pages check who
may change an instrument, and the pipelines demo loader gives its users their roles.
``reduction`` must import nothing from ``pipelines``, so this cannot live in ``pipelines``;
``workflow_site`` is wiring only. It imports neither app: the apps it covers are named by label.

- ``viewers``: read everything.
- ``scientists``: read everything; change the reduction configuration of the instruments whose
  ``scientists_<key>`` group they are in.
- ``operators``: everything in the admin (data path, workflow, schedules), every instrument.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group, Permission
from django.db import transaction
from django.db.models import Q

VIEWERS = "viewers"
SCIENTISTS = "scientists"
OPERATORS = "operators"
ROLE_GROUPS = (VIEWERS, SCIENTISTS, OPERATORS)

# Apps whose models the roles cover.
_OUR_APPS = ("pipelines", "reduction")
_OPERATOR_APPS = (*_OUR_APPS, "django_celery_beat")


def instrument_group_name(instrument_key: str) -> str:
    return f"scientists_{instrument_key}"


@transaction.atomic
def ensure_groups() -> dict[str, Group]:
    """Create (or bring up to date) the role groups and their permissions. Idempotent."""
    groups = {name: Group.objects.get_or_create(name=name)[0] for name in ROLE_GROUPS}
    view = Permission.objects.filter(
        content_type__app_label__in=_OPERATOR_APPS, codename__startswith="view_"
    )
    groups[VIEWERS].permissions.set(view)
    groups[SCIENTISTS].permissions.set(
        Permission.objects.filter(
            Q(content_type__app_label__in=_OPERATOR_APPS, codename__startswith="view_")
            | Q(content_type__app_label="reduction", codename__regex=r"^(add|change)_")
        )
    )
    groups[OPERATORS].permissions.set(
        Permission.objects.filter(content_type__app_label__in=_OPERATOR_APPS)
    )
    return groups


def ensure_instrument_group(instrument_key: str) -> Group:
    return Group.objects.get_or_create(name=instrument_group_name(instrument_key))[0]


def _in_group(user: AbstractBaseUser | AnonymousUser, name: str) -> bool:
    return bool(user.is_authenticated and user.groups.filter(name=name).exists())  # type: ignore[attr-defined]


def is_operator(user: AbstractBaseUser | AnonymousUser) -> bool:
    return bool(getattr(user, "is_superuser", False)) or _in_group(user, OPERATORS)


def can_change_instrument(user: AbstractBaseUser | AnonymousUser, instrument_key: str) -> bool:
    """Operators may change every instrument; scientists only those they are assigned to."""
    if not user.is_authenticated:
        return False
    if is_operator(user):
        return True
    return _in_group(user, SCIENTISTS) and _in_group(user, instrument_group_name(instrument_key))
