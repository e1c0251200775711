"""Durable workflows with live, append-only output streams for Django."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DatabaseUnavailable",
    "DurableStreamsError",
    "EventTimeout",
    "MessageTimeout",
    "NonDeterministicWorkflow",
    "Status",
    "ScheduledWorkflow",
    "SchemaMissing",
    "StepFailed",
    "StreamClosed",
    "StreamTimeout",
    "WorkflowCancelled",
    "WorkflowConflict",
    "WorkflowFailed",
    "WorkflowHandle",
    "WorkflowNotFound",
    "WorkflowTimeout",
    "aget_event",
    "aread_stream",
    "asend",
    "cancel_workflow",
    "close_stream",
    "current_workflow_id",
    "get_event",
    "get_workflow",
    "list_schedules",
    "read_stream",
    "recv",
    "run_step",
    "send",
    "set_event",
    "sleep",
    "start_workflow",
    "step",
    "workflow",
    "write_stream",
]

from .exceptions import (
    DatabaseUnavailable,
    DurableStreamsError,
    EventTimeout,
    MessageTimeout,
    NonDeterministicWorkflow,
    SchemaMissing,
    StepFailed,
    StreamClosed,
    StreamTimeout,
    WorkflowCancelled,
    WorkflowConflict,
    WorkflowFailed,
    WorkflowNotFound,
    WorkflowTimeout,
)

if TYPE_CHECKING:
    from .api import (
        WorkflowHandle,
        aget_event,
        aread_stream,
        asend,
        cancel_workflow,
        close_stream,
        current_workflow_id,
        get_event,
        get_workflow,
        read_stream,
        recv,
        run_step,
        send,
        set_event,
        sleep,
        start_workflow,
        step,
        workflow,
        write_stream,
    )
    from .models import Status
    from .scheduler import ScheduledWorkflow, list_schedules


def __getattr__(name: str) -> Any:
    # The API imports models, which need the app registry: load it on first use
    # so that importing durable_streams (e.g. from settings) stays cheap and safe.
    if name == "Status":
        from .models import Status

        return Status
    if name in ("ScheduledWorkflow", "list_schedules"):
        from . import scheduler

        return getattr(scheduler, name)
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'durable_streams' has no attribute {name!r}")
