"""The admin: every workflow, its steps and its streams, live; cancel, resume and retry.

History is read-only here. Workflows change only through the three actions, each
guarded by its own permission (``durable_streams.cancel_workflow``,
``resume_workflow`` and ``retry_workflow``), on the changelist and on the page of
one workflow. The running worker processes are listed, read-only too. Nothing that
can grow without bound (steps, stream entries, the table itself) is ever loaded or
counted whole.
"""

from .workers import WorkerProcessAdmin
from .workflows import WorkflowAdmin

__all__ = ["WorkerProcessAdmin", "WorkflowAdmin"]
