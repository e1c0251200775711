"""Small database helpers shared by the runtime, the worker and the readers."""

from __future__ import annotations

from django.db import connections

from .conf import get_config


def alias() -> str:
    return get_config().DATABASE


def take_write_lock(using: str) -> None:
    """Start the current transaction as a writer.

    SQLite opens transactions as readers; a reader that later writes fails at once
    with "database is locked" when another connection wrote in between. A no-op
    UPDATE takes the write lock up front, so the busy timeout applies instead.
    Other databases lock rows as they go and need nothing.
    """
    connection = connections[using]
    if connection.vendor == "sqlite" and connection.in_atomic_block:
        from .models import Workflow

        with connection.cursor() as cursor:
            cursor.execute(f'UPDATE "{Workflow._meta.db_table}" SET "id" = "id" WHERE 0 = 1')
