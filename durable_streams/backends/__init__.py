"""The database backends: everything that differs between the databases durable_streams runs on.

``backend_for(using)`` gives the one backend object of a database alias. Nothing
outside this package asks which database is running.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.checks import Error
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import DatabaseError, connections
from django.db.utils import load_backend

from ..exceptions import ConfigurationError
from .base import Backend
from .mysql import MySQLBackend
from .postgresql import PostgreSQLBackend
from .sqlite import SQLiteBackend

if TYPE_CHECKING:
    from django.core.checks import CheckMessage
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = [
    "Backend",
    "UnsupportedDatabase",
    "backend_for",
    "check_database",
    "check_server",
    "reset_backends",
]

BACKENDS: dict[str, type[Backend]] = {
    backend.vendor: backend for backend in (SQLiteBackend, PostgreSQLBackend, MySQLBackend)
}

SUPPORTED = "SQLite, PostgreSQL 14+ (psycopg 3), MariaDB 10.6+ and MySQL 8.0+"


class UnsupportedDatabase(ConfigurationError):
    """A database that Django supports but durable_streams does not."""


_backends: dict[tuple[str, str], Backend] = {}
_lock = threading.Lock()


def backend_for(using: str) -> Backend:
    """The backend of database alias ``using``: one object per alias and vendor."""
    vendor = connections[using].vendor
    backend = _backends.get((using, vendor))
    if backend is None:
        cls = BACKENDS.get(vendor)
        if cls is None:
            raise UnsupportedDatabase(
                f"Database {using!r} is {connections[using].display_name}, which "
                f"durable_streams does not support; it runs on {SUPPORTED}."
            )
        with _lock:
            backend = _backends.setdefault((using, vendor), cls(using))
    return backend


def reset_backends(**kwargs: Any) -> None:
    """Forget every backend (the databases' settings changed)."""
    with _lock:
        _backends.clear()


def _databases_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "DATABASES":
        reset_backends()


setting_changed.connect(_databases_changed, dispatch_uid="durable_streams.backends")


def connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """The ``connection_created`` receiver: each backend sets up its connections."""
    cls = BACKENDS.get(connection.vendor)
    if cls is not None:
        # Not through backend_for(): Django opens connections of no alias too.
        cls.connection_created(connection)


def check_database(using: str) -> list[CheckMessage]:
    """System check messages for database ``using``, found without connecting: an
    unsupported database, a missing driver, settings these transactions are not made for."""
    settings_dict = settings.DATABASES[using]
    engine = str(settings_dict.get("ENGINE", ""))
    unsupported = Error(
        f"Database {using!r} uses {engine!r}, which durable_streams does not support; it "
        f"runs on {SUPPORTED}.",
        hint="Use one of them in DATABASES (for PostgreSQL: pip install "
        '"durable-streams[postgres]"; for MariaDB/MySQL: pip install "durable-streams[mysql]").',
        id="durable_streams.E005",
    )
    try:
        wrapper = load_backend(engine).DatabaseWrapper
    except (ImproperlyConfigured, ImportError) as exc:
        # Django could not load the engine or its driver.
        if "postg" in engine:
            # Without psycopg 3 (whatever else is missing): the error that says so.
            missing = BACKENDS["postgresql"].check_installed(using, settings_dict)
            if missing:
                return missing
        extra = "postgres" if "postg" in engine else "mysql" if "mysql" in engine else None
        if extra is None:
            return [unsupported]
        return [
            Error(
                f"Database {using!r} cannot be used: {exc}",
                hint=f'pip install "durable-streams[{extra}]"',
                id="durable_streams.E005",
            )
        ]
    cls = BACKENDS.get(wrapper.vendor)
    if cls is None:
        return [unsupported]
    return cls.check_installed(using, settings_dict)


def check_server(using: str) -> list[CheckMessage]:
    """System check messages for the server of database ``using`` (its version); connects."""
    if any(message.is_serious() for message in check_database(using)):
        return []  # check_database() says why
    # Unreachable: Django's own checks and the first query say so.
    with contextlib.suppress(DatabaseError):
        return backend_for(using).check_server()
    return []
