from django.apps import AppConfig


class ReductionConfig(AppConfig):
    name = "reduction"
    verbose_name = "Autoreduction configuration"
    default_auto_field = "django.db.models.BigAutoField"
