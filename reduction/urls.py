from django.urls import path

from . import views

app_name = "reduction"

# Mounted at /reduction/. <key> is a key of reduction.instruments.INSTRUMENTS; others are 404.
urlpatterns = [
    path("", views.index, name="index"),
    path("<slug:key>/", views.configure, name="configure"),
    path("<slug:key>/preview/", views.preview, name="preview"),
    path("<slug:key>/reset/", views.reset, name="reset"),
    path("<slug:key>/history/", views.history, name="history"),
    path("<slug:key>/diff/", views.diff, name="diff"),
]
