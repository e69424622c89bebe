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
