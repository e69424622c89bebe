from django.urls import path

from . import views

app_name = "reduction"

urlpatterns = [
    path("", views.index, name="index"),
]
