from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

admin.site.site_header = "Facility data workflow"
admin.site.site_title = "Workflow admin"
admin.site.index_title = "Operations database"

urlpatterns = [
    path("admin/", admin.site.urls),
    # Browsers and bookmark tools ask for /favicon.ico whatever the pages link.
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
    # Log in, log out and change one's own password. No password-reset pages: the site sends no
    # mail, so they would claim to have emailed instructions that never leave. An operator sets
    # a forgotten password in the admin or with `manage.py changepassword`.
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "accounts/password_change/",
        auth_views.PasswordChangeView.as_view(),
        name="password_change",
    ),
    path(
        "accounts/password_change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    path("reduction/", include("reduction.urls")),
    path("", include("pipelines.urls")),
]
