"""Workflows that a cancel or a failure interrupts and a resume lets finish."""

from __future__ import annotations

import time
from typing import Any

from durable_streams import close_stream, current_workflow_id, step, workflow, write_stream
from durable_streams.models import Status
from durable_streams.models import Workflow as WorkflowRun

from .models import Effect


def _gate_open(label: str) -> bool:
    return Effect.objects.filter(label=label).exists()


@step
def gate_or_end(label: str, timeout: float) -> bool:
    """Wait for the gate; return early once the workflow stopped running (cancelled)."""
    workflow_id = current_workflow_id()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gate_open(label):
            return True
        status = WorkflowRun.objects.filter(pk=workflow_id).values_list("status", flat=True)
        if status.first() != Status.RUNNING:
            return False  # its checkpoint is refused: the run stops here
        time.sleep(0.01)
    return False


@step
def require_gate(label: str) -> None:
    if not _gate_open(label):
        raise ValueError(f"gate {label} is shut")


@workflow
def interruptible(key: str, before: list[Any], after: list[Any], gate: str, fail: bool) -> int:
    """Writes ``before``, closes ``header`` for good, then waits at the gate (or fails
    there, with ``fail``), then writes ``after`` and closes ``key``."""
    write_stream("header", "hello")
    close_stream("header")
    for value in before:
        write_stream(key, value)
    if fail:
        require_gate(gate)
    else:
        gate_or_end(gate, 30.0)
    for value in after:
        write_stream(key, value)
    close_stream(key)
    return len(before) + len(after)
