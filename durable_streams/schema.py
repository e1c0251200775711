"""Whether durable_streams' migrations are applied to its database.

A worker or a start against a database without the tables would otherwise fail
with the database's own "no such table" error, which never says to migrate.
"""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from .exceptions import SchemaMissing

APP_LABEL = "durable_streams"


def unapplied_migrations(using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Names of this app's migrations not yet applied to ``using``, in order."""
    # Imported here: the migration loader imports every app's migrations, which
    # needs the app registry ready, and this module is imported before that.
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(connections[using], ignore_no_migrations=True)
    plan = [
        node
        for leaf in loader.graph.leaf_nodes(APP_LABEL)
        for node in loader.graph.forwards_plan(leaf)
        if node[0] == APP_LABEL
    ]
    names = [name for _, name in dict.fromkeys(plan)]
    return [name for name in names if (APP_LABEL, name) not in loader.applied_migrations]


def require_schema(using: str = DEFAULT_DB_ALIAS) -> None:
    """Raise :class:`SchemaMissing` if this app's migrations are not all applied."""
    missing = unapplied_migrations(using)
    if missing:
        raise SchemaMissing(missing_message(using, missing))


def missing_message(using: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    database = "" if using == DEFAULT_DB_ALIAS else f" --database {using}"
    return (
        f"durable_streams has {len(missing)} unapplied migration(s) on database {using!r} "
        f"({shown}): its tables are missing or out of date. "
        f"Run 'python manage.py migrate{database}'."
    )


def explain(exc: DatabaseError, using: str) -> SchemaMissing | None:
    """The :class:`SchemaMissing` behind a database error, if missing tables caused it."""
    try:
        missing = unapplied_migrations(using)
    except DatabaseError:
        return None
    return SchemaMissing(missing_message(using, missing)) if missing else None
