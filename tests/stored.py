"""What the database holds for a workflow's streams, read directly."""

from __future__ import annotations

from typing import Any

from durable_streams.models import Stream, StreamEntry


def stream_length(workflow_id: str, key: str) -> int:
    """The stream's stored length; 0 for a stream not written yet."""
    return (
        Stream.objects.filter(workflow_id=workflow_id, key=key)
        .values_list("length", flat=True)
        .first()
        or 0
    )


def stream_entries(workflow_id: str, key: str) -> list[tuple[int, Any]]:
    """(offset, value) of every stored entry of a stream, in offset order."""
    rows = StreamEntry.objects.filter(stream__workflow_id=workflow_id, stream__key=key)
    return [(e.offset, e.decoded_value) for e in rows.order_by("offset")]


def stream_values(workflow_id: str, key: str) -> list[Any]:
    """The stored values of a stream, in offset order."""
    return [value for _, value in stream_entries(workflow_id, key)]
