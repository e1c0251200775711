"""The database backends: what each database needs, asked of one object per alias."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

import durable_streams
from durable_streams.backends import backend_for
from durable_streams.models import Stream, StreamEntry, StreamEntryQuerySet
from durable_streams.worker import Worker
from tests import workflows

pytestmark = pytest.mark.django_db(transaction=True)

PACKAGE = Path(durable_streams.__file__).parent


def test_the_backend_is_the_one_of_the_running_database() -> None:
    backend = backend_for("default")
    assert backend.vendor == connection.vendor
    assert backend_for("default") is backend


def test_a_stream_operation_is_written_once_on_every_database() -> None:
    # A conditional unique constraint; where the database cannot hold one, a
    # migration adds an index that allows the same rows.
    wid = workflows.echo.start().workflow_id
    now = timezone.now()
    stream = Stream.objects.create(workflow_id=wid, key="out", length=4, created_at=now)
    rows = [(0, 1), (1, None), (2, None)]
    for offset, operation in rows:
        StreamEntry.objects.create(
            stream=stream, offset=offset, value="0", operation=operation, created_at=now
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        StreamEntry.objects.create(stream=stream, offset=3, value="0", operation=1, created_at=now)
    assert StreamEntry.objects.filter(stream=stream).count() == 3


def test_the_writer_splits_its_batches_to_the_servers_statement_limit(
    run_burst: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = backend_for("default")
    if backend.one_statement:
        pytest.skip("the backend stores a batch in one statement of its own")
    limit = 64 * 1024
    monkeypatch.setattr(type(backend), "max_statement_bytes", lambda self: limit)
    sizes: list[int] = []
    bulk_create = StreamEntryQuerySet.bulk_create

    def recording(self: Any, objs: Any, *args: Any, **kwargs: Any) -> Any:
        objs = list(objs)
        sizes.append(sum(len(entry.value.encode()) for entry in objs))
        return bulk_create(self, objs, *args, **kwargs)

    monkeypatch.setattr(StreamEntryQuerySet, "bulk_create", recording)
    values = ["é" * 2000 + str(i) for i in range(200)]  # about 800 kB in all
    handle = workflows.write_values.start("big", values)
    run_burst()
    assert handle.result(timeout=10) == len(values)
    stored = StreamEntry.objects.filter(stream__workflow_id=handle.workflow_id)
    texts = stored.order_by("offset").values_list("value", flat=True)
    assert [json.loads(text) for text in texts] == values
    assert max(sizes) <= limit // 2
    assert sum(sizes) > limit  # the limit was what split them


def test_no_module_outside_the_backends_asks_for_the_database_vendor() -> None:
    drivers = {"psycopg", "psycopg2", "MySQLdb", "sqlite3"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("backends", "migrations"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "vendor":
                offenders.append(f"{relative}:{node.lineno} .vendor")
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.split(".")[0] in drivers:
                    offenders.append(f"{relative}:{node.lineno} imports {name}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value.upper()
                if "ON CONFLICT" in text or "SKIP LOCKED" in text or "PG_NOTIFY" in text:
                    offenders.append(f"{relative}:{node.lineno} vendor SQL")
    assert offenders == []
