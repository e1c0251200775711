from __future__ import annotations

from django.apps import AppConfig
from django.db.backends.signals import connection_created
from django.utils.module_loading import autodiscover_modules
from django.utils.translation import gettext_lazy as _

from .backends import connection_created as set_up_connection


class DurableStreamsConfig(AppConfig):
    name = "durable_streams"
    label = "durable_streams"
    verbose_name = _("Durable streams")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, once the app registry is ready: registering the system checks
        # imports the reader rules, which import the models.
        from . import checks  # noqa: F401 - registers the system checks

        connection_created.connect(set_up_connection, dispatch_uid="durable_streams.connections")
        # Workflows live in each app's workflows.py, found like admin.py.
        autodiscover_modules("workflows")
