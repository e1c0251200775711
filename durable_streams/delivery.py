"""Push of committed stream changes to live subscribers (WebSocket and SSE clients).

The runtime calls these after the transaction that stored the change commits, in
the writing process. They must never raise into the workflow, and never block it
for long.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("durable_streams.delivery")


def entries_committed(workflow_id: str, key: str, first_offset: int, values: list[str]) -> None:
    """``values`` (JSON texts) were stored at ``first_offset`` and on in stream ``key``."""


def stream_closed(workflow_id: str, key: str, length: int) -> None:
    """Stream ``key`` was closed with ``length`` values."""


def workflow_ended(workflow_id: str) -> None:
    """The workflow reached a final status; every stream it had is closed now."""
