"""What the reduction configuration announces to the apps that depend on it.

``reduction`` knows none of its dependants (the workflow in ``pipelines`` uses the configuration,
never the other way round), so a change they must react to is sent as a signal; each dependant
connects its receiver in its ``AppConfig.ready()``. Receivers should only call a service of their
own app: no domain logic in a receiver.
"""

from __future__ import annotations

from django.dispatch import Signal

# Sent by ``reduction.services.reduction_config_update`` each time it creates a ParameterSet, with
# ``sender=ParameterSet`` and the keyword arguments ``instrument_key`` (str), ``parameter_set``
# (the new version) and ``previous`` (the version it supersedes, None for version 1). Never sent
# when a save changes nothing.
#
# Sent inside the save's transaction, while the instrument's lock row is held, after the new
# version and its audit rows exist and before the script file is placed: what a receiver writes
# commits or rolls back with the new version, and an exception a receiver raises aborts the save
# (nothing stored, the script file untouched) and reaches the caller. With no receiver connected
# the save is unaffected. Receivers must not start work outside the database that cannot be
# undone; use ``transaction.on_commit`` for that.
parameter_set_created = Signal()
