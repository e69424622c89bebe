"""Django admin for every ops-db model. One module per topic, like the models; importing the
package registers them all (Django's admin autodiscovery imports ``pipelines.admin``)."""

from . import events, files, locations, observatory, transfers, workflow

__all__ = ["events", "files", "locations", "observatory", "transfers", "workflow"]
