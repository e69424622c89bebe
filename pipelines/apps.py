from django.apps import AppConfig


class PipelinesConfig(AppConfig):
    name = "pipelines"
    verbose_name = "Facility data path"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # reduction announces new parameter sets instead of importing the workflow (it imports
        # nothing from pipelines). Connecting the same function again is a no-op, so a second
        # ready() (tests) does not mark twice.
        from pipelines.receivers import parameter_set_created_mark_stale
        from reduction.signals import parameter_set_created

        parameter_set_created.connect(parameter_set_created_mark_stale)

        # Staleness (issue 12, campaigns): a saved software version or step may change what a
        # step resolves to; products made otherwise become stale (services/products.py).
        from django.db.models.signals import post_save

        from pipelines.models import ReductionSoftwareVersion, ReductionStep
        from pipelines.receivers import version_or_step_saved_refresh_staleness

        for model in (ReductionSoftwareVersion, ReductionStep):
            post_save.connect(
                version_or_step_saved_refresh_staleness,
                sender=model,
                dispatch_uid=f"staleness-{model.__name__}",
            )
