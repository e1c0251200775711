from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created
from django.utils.translation import gettext_lazy as _


class DurableStreamsConfig(AppConfig):
    name = "durable_streams"
    label = "durable_streams"
    verbose_name = _("Durable streams")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        from . import checks  # noqa: F401 - registers the system checks

        connection_created.connect(configure_sqlite, dispatch_uid="durable_streams.sqlite")
        # Workflows live in each app's workflows.py, found like admin.py.
        autodiscover_modules("workflows")


def configure_sqlite(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Let the worker and the web server share one SQLite file."""
    if connection.vendor != "sqlite":
        return
    with connection.cursor() as cursor:
        # WAL: readers never block the writer, nor the writer the readers.
        cursor.execute("PRAGMA journal_mode=WAL")
        if "timeout" not in connection.settings_dict.get("OPTIONS", {}):
            # Wait for the write lock rather than fail at once.
            cursor.execute("PRAGMA busy_timeout = 20000")
