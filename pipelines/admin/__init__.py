"""Django admin for every ops-db model. One module per topic, like the models; importing the
package registers them all (Django's admin autodiscovery imports ``pipelines.admin``)."""

from django.contrib import admin

from . import events, files, locations, observatory, site, transfers, workflow

site.install(admin.site)

__all__ = ["events", "files", "locations", "observatory", "site", "transfers", "workflow"]
