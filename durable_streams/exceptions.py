"""Every error durable_streams raises derives from :class:`DurableStreamsError`."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class DurableStreamsError(Exception):
    """Root of every durable_streams error."""


class ConfigurationError(DurableStreamsError, ImproperlyConfigured):
    """The ``DURABLE_STREAMS`` setting (or a database setting) is wrong."""


class ImproperlyInstalled(DurableStreamsError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, missing_package: str, extra: str) -> None:
        self.missing_package = missing_package
        self.extra = extra
        super().__init__(
            f"{missing_package} is required for this feature of durable_streams. "
            f'Install it with: pip install "durable-streams[{extra}]"'
        )


class WorkflowNotFound(DurableStreamsError, LookupError):
    """No workflow with the given id exists."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"No workflow with id {workflow_id!r}.")


class WorkflowNotRegistered(DurableStreamsError, LookupError):
    """No function is registered under a workflow name."""


class WorkflowConflict(DurableStreamsError):
    """A workflow id is already used by a run that this start does not repeat.

    Another workflow, or the same one with another owner, visibility or inputs.
    """


def _where(key: str | None, length: int | None) -> str:
    if key is None:
        return ""
    return f" (stream {key!r} interrupted at length {length})"


class WorkflowFailed(DurableStreamsError):
    """The workflow ended in ERROR; carries the original error's type name and message.

    Raised by ``read_stream`` at a stream that the failure interrupted: then ``key``
    and ``length`` (the values written before it) say which and where, else None.
    """

    def __init__(
        self,
        workflow_id: str,
        error_type: str,
        message: str,
        *,
        key: str | None = None,
        length: int | None = None,
    ) -> None:
        self.workflow_id = workflow_id
        self.error_type = error_type
        self.message = message
        self.key = key
        self.length = length
        super().__init__(
            f"Workflow {workflow_id!r} failed: {error_type}: {message}" + _where(key, length)
        )


class WorkflowCancelled(DurableStreamsError):
    """The workflow was cancelled.

    Raised by ``read_stream`` at a stream that the cancellation interrupted: then
    ``key`` and ``length`` (the values written before it) say which and where, else None.
    """

    def __init__(
        self, workflow_id: str, *, key: str | None = None, length: int | None = None
    ) -> None:
        self.workflow_id = workflow_id
        self.key = key
        self.length = length
        super().__init__(f"Workflow {workflow_id!r} was cancelled{_where(key, length)}.")


class WorkflowTimeout(DurableStreamsError, TimeoutError):
    """``result(timeout=...)`` ran out of time before the workflow ended."""


class StepFailed(DurableStreamsError):
    """A step inside a workflow raised on its last attempt.

    The same exception is raised when the step runs and when a replay meets its
    recorded failure, so workflow code that catches it behaves the same both times.
    ``error_type`` and ``message`` describe the step's own exception; while the
    step runs live it is also chained as ``__cause__``.
    """

    def __init__(self, step_name: str, error_type: str, message: str) -> None:
        self.step_name = step_name
        self.error_type = error_type
        self.message = message
        super().__init__(f"Step {step_name!r} failed: {error_type}: {message}")


class NonDeterministicWorkflow(DurableStreamsError):
    """A replay reached an operation that differs from the one recorded at that position."""


class StreamClosed(DurableStreamsError):
    """A value was written to a stream that is already closed."""

    def __init__(self, workflow_id: str, key: str) -> None:
        self.workflow_id = workflow_id
        self.key = key
        super().__init__(f"Stream {key!r} of workflow {workflow_id!r} is closed.")


class StreamTimeout(DurableStreamsError, TimeoutError):
    """No next stream value arrived within the reader's timeout."""

    def __init__(self, workflow_id: str, key: str, offset: int, timeout: float) -> None:
        self.workflow_id = workflow_id
        self.key = key
        self.offset = offset
        self.timeout = timeout
        super().__init__(
            f"No value at offset {offset} of stream {key!r} of workflow "
            f"{workflow_id!r} within {timeout} seconds."
        )


class MessageTimeout(DurableStreamsError, TimeoutError):
    """``recv(timeout=...)`` found no message on its topic in time.

    Recorded: a replay of the workflow raises it again at the same point.
    """

    def __init__(self, workflow_id: str, topic: str | None, timeout: float) -> None:
        self.workflow_id = workflow_id
        self.topic = topic
        self.timeout = timeout
        on = "the default topic" if topic is None else f"topic {topic!r}"
        super().__init__(
            f"No message on {on} for workflow {workflow_id!r} within {timeout} seconds."
        )


class EventTimeout(DurableStreamsError, TimeoutError):
    """``get_event(timeout=...)``: the workflow did not set the key in time."""

    def __init__(self, workflow_id: str, key: str, timeout: float) -> None:
        self.workflow_id = workflow_id
        self.key = key
        self.timeout = timeout
        super().__init__(
            f"Workflow {workflow_id!r} did not set event {key!r} within {timeout} seconds."
        )


class DatabaseUnavailable(DurableStreamsError):
    """A reader or result waiter could not reach the database for ``READER_RETRY_SECONDS``.

    The database error that it retried last is chained as ``__cause__``.
    """


class NotInWorkflow(DurableStreamsError, RuntimeError):
    """A function that needs a running workflow was called outside one."""


class LeaseLost(DurableStreamsError):
    """This worker no longer holds the workflow (cancelled, or reclaimed elsewhere).

    Raised inside the workflow's thread to stop it without recording anything.
    """


class SchemaMissing(ConfigurationError):
    """durable_streams' migrations are not applied to its database; run ``migrate``."""


class Interrupted(BaseException):
    """Stops a workflow's thread at a step boundary without recording anything.

    A BaseException so that ``except Exception`` in user code cannot swallow it.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Suspended(BaseException):
    """Ends a workflow's thread in a long wait: the worker leaves the run WAITING.

    ``operation`` is the sleep's or the recv's; ``topic`` the recv's ("" the default
    topic; None for a sleep); ``wake_at`` (a Unix time) the sleep's wake time or the
    recv's deadline, None for a recv without a timeout. A BaseException, like
    ``Interrupted``, so that user code cannot swallow it.
    """

    def __init__(self, operation: int, topic: str | None, wake_at: float | None) -> None:
        self.operation = operation
        self.topic = topic
        self.wake_at = wake_at
        super().__init__(f"suspended at operation {operation}")
