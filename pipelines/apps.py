from django.apps import AppConfig


class PipelinesConfig(AppConfig):
    name = "pipelines"
    verbose_name = "Facility data path"
    default_auto_field = "django.db.models.BigAutoField"
