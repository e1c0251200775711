"""Run a workflow to its end inside a test, durably, and look at what it did.

``run_workflow(wf, *args, **kwargs)`` starts a run and works it off with a real
worker in this process (the same code as ``runworkers --burst``), so steps are
checkpointed and stream values stored as in production. The worker's threads use
connections of their own: with pytest-django, mark the test
``@pytest.mark.django_db(transaction=True)`` (or use ``TransactionTestCase``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from . import encoding
from .api import OPTION_NAMES, WorkflowFunction, WorkflowHandle, start_workflow
from .db import alias
from .exceptions import WorkflowTimeout
from .models import Status, Stream, StreamEntry, Workflow
from .runtime import registry
from .worker import Worker

__all__ = ["Run", "run_workflow"]


@dataclass(frozen=True)
class Run:
    """What a run did, read back from the database once it ended."""

    workflow_id: str
    status: str
    #: The return value (SUCCESS), else None.
    output: Any
    #: The error record (``type``, ``message``, ``traceback``) of an ERROR end, else None.
    error: dict[str, str] | None
    #: Every stream the run wrote, key to its values in order.
    streams: dict[str, list[Any]] = field(default_factory=dict)

    def result(self) -> Any:
        """The output, or the ``WorkflowFailed`` / ``WorkflowCancelled`` that ended the run."""
        return WorkflowHandle(self.workflow_id).result(timeout=0)


def run_workflow(
    wf: WorkflowFunction[..., Any], /, *args: Any, timeout: float = 30.0, **kwargs: Any
) -> Run:
    """Start ``wf(*args, **kwargs)`` and run it, and the runs it starts, to their end.

    Options are bound with ``wf.using()``. For compatibility ``kwargs`` take
    ``start_workflow``'s options too (``workflow_id``, ``owner``, ``public``,
    ``queue``), and like it refuse a workflow with a parameter of such a name
    when one is given. Raises ``WorkflowTimeout``
    if the run has not ended after ``timeout`` seconds (it is cancelled then), and
    ``AssertionError`` if no worker of this process can take it (its workflow or
    queue is not registered), instead of waiting forever.
    """
    if not isinstance(wf, WorkflowFunction):
        raise TypeError(f"run_workflow() takes a @workflow function, not {type(wf).__name__}.")
    if OPTION_NAMES & kwargs.keys():
        handle = start_workflow(wf, *args, **kwargs)
    else:
        handle = wf.start(*args, **kwargs)
    queues = {registry.get(name).queue for name in registry.names()}
    queues.add(
        Workflow.objects.using(alias()).values_list("queue", flat=True).get(pk=handle.workflow_id)
    )
    worker = Worker(queues=sorted(queues), burst=True, worker_id="durable-streams-testing")
    thread = threading.Thread(target=worker.run, name="durable-streams-testing", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        handle.cancel()
        worker.stop()
        thread.join(timeout)
        raise WorkflowTimeout(
            f"Workflow {handle.workflow_id!r} ({wf.name}) did not end within {timeout} seconds "
            "and was cancelled: does it wait for something nothing in the test provides?"
        )
    return _read_back(handle.workflow_id, wf.name)


def _read_back(workflow_id: str, name: str) -> Run:
    using = alias()
    status, output, error = (
        Workflow.objects.using(using).values_list("status", "output", "error").get(pk=workflow_id)
    )
    if status == Status.WAITING:
        raise AssertionError(
            f"Workflow {workflow_id!r} ({name}) waits for a message (status WAITING) that "
            "nothing sent it while the worker ran: it was suspended in a recv() without a "
            "timeout. Send it from a workflow this worker runs too, or use start() with a "
            "worker of your own and send() it from the test."
        )
    if status not in (Status.SUCCESS, Status.ERROR, Status.CANCELLED):
        raise AssertionError(
            f"Workflow {workflow_id!r} ({name}) is still {status} after the worker ran out of "
            "work: no workflow registered in this process takes it. Is it defined in a "
            "workflows.py module of an installed app?"
        )
    streams: dict[str, list[Any]] = {}
    for stream_id, key in (
        Stream.objects.using(using)
        .filter(workflow_id=workflow_id)
        .order_by("created_at", "pk")
        .values_list("pk", "key")
    ):
        streams[key] = [
            encoding.loads(value)
            for value in StreamEntry.objects.using(using)
            .filter(stream_id=stream_id)
            .order_by("offset")
            .values_list("value", flat=True)
        ]
    return Run(
        workflow_id=workflow_id,
        status=str(status),
        output=None if output is None else encoding.loads(output),
        error=None if error is None else encoding.loads(error),
        streams=streams,
    )
