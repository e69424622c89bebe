from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "Facility data workflow"
admin.site.site_title = "Workflow admin"
admin.site.index_title = "Operations database"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("reduction/", include("reduction.urls")),
    path("", include("pipelines.urls")),
]
