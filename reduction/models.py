"""Autoreduction configuration (SNS style): one row per instrument parameter, an audit row per
change, and an immutable numbered version of every saved parameter set."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models


class ReductionProperty(models.Model):
    """The current value of one parameter of one instrument's reduction."""

    # Key in reduction.instruments.INSTRUMENTS.
    instrument = models.CharField(max_length=50)
    key = models.CharField(max_length=100)
    # Stored as JSON so lists, numbers and booleans round-trip without string parsing.
    value = models.JSONField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "reduction_property"
        verbose_name_plural = "reduction properties"
        ordering = ["instrument", "key"]
        constraints = [
            models.UniqueConstraint(
                fields=["instrument", "key"], name="reduction_property_unique_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instrument}.{self.key}"


class ParameterSetAction(models.TextChoices):
    EDIT = "edit", "Edited"
    RESET = "reset", "Reset to defaults"
    IMPORT = "import", "Imported"


class ImmutableRowError(Exception):
    pass


class ParameterSetQuerySet(models.QuerySet["ParameterSet"]):
    def for_instrument(self, instrument: str) -> ParameterSetQuerySet:
        return self.filter(instrument=instrument)

    def latest_for(self, instrument: str) -> ParameterSet | None:
        """The newest version of ``instrument`` (served by the unique (instrument, number))."""
        return self.filter(instrument=instrument).order_by("-number").first()


class ParameterSet(models.Model):
    """An immutable, numbered version of an instrument's full parameter set and the checksum of
    the script it rendered. Runs and products point here to say exactly what made them."""

    Action = ParameterSetAction

    instrument = models.CharField(max_length=50)
    number = models.PositiveIntegerField()
    values = models.JSONField(default=dict)
    script_path = models.CharField(max_length=1000, blank=True, default="")
    script_checksum = models.CharField(max_length=128, blank=True, default="")
    # The rendered script itself, so any version can be re-installed, diffed or given to a run
    # byte for byte even after the instrument's template has changed.
    script_text = models.TextField(blank=True, default="")
    action = models.CharField(
        max_length=10, choices=ParameterSetAction.choices, default=ParameterSetAction.EDIT
    )
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="reduction_parameter_sets",
    )
    comment = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ParameterSetQuerySet.as_manager()

    class Meta:
        db_table = "reduction_parameter_set"
        ordering = ["instrument", "-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["instrument", "number"], name="reduction_parameter_set_unique_number"
            ),
            models.CheckConstraint(
                condition=models.Q(number__gte=1), name="reduction_parameter_set_number_positive"
            ),
            models.CheckConstraint(
                condition=models.Q(action__in=ParameterSetAction.values),
                name="reduction_parameter_set_action_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instrument} v{self.number}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # Runs and products cite a version; changing one after the fact would rewrite history.
        if not self._state.adding:
            raise ImmutableRowError(f"{self} is a saved parameter set and cannot be changed")
        super().save(*args, **kwargs)


class PropertyModification(models.Model):
    """Who changed which parameter from what to what, and in which saved version."""

    property = models.ForeignKey(
        ReductionProperty, on_delete=models.PROTECT, related_name="modifications"
    )
    parameter_set = models.ForeignKey(
        ParameterSet, on_delete=models.PROTECT, null=True, blank=True, related_name="modifications"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="reduction_property_modifications",
    )
    modified_at = models.DateTimeField(auto_now_add=True)
    old_value = models.JSONField(null=True, blank=True)
    new_value = models.JSONField(null=True, blank=True)

    class Meta:
        db_table = "reduction_property_modification"
        ordering = ["-modified_at", "-id"]
        indexes = [
            models.Index(fields=["property", "-modified_at"], name="reduction_mod_property_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.property}: {self.old_value!r} -> {self.new_value!r}"


class ReductionConfigLock(models.Model):
    """One row per instrument, locked (SELECT ... FOR UPDATE) for the whole of a save so that
    concurrent saves of one instrument run one after the other: consecutive version numbers,
    old values read after the previous save committed, and the script on disk always the one
    of the latest version."""

    instrument = models.CharField(max_length=50, unique=True)

    class Meta:
        db_table = "reduction_config_lock"

    def __str__(self) -> str:
        return self.instrument
