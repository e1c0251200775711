"""What a workflow waits for: durable sleep, messages (send/recv) and events.

Each wait function that has an effect takes the body's next operation number and
records it as a checkpoint (under a step name of ``WAIT_KINDS``): a sleep's wake time,
a recv's message or timeout, a send, a set_event. A replay finds them and returns
the same thing at the same point. Messages and events have tables of their own, so
that a waiting run can later be suspended and woken by what arrives.

A short wait blocks in place: it keeps its worker slot, and its lease, which the
worker's heartbeat renews. It waits on the wake-up path (the bus) with a bounded
wait, and wakes at once when it is cancelled or its worker stops. A wait longer than
``SUSPEND_AFTER_SECONDS`` suspends the run: ``Suspended`` ends its thread, the worker
records the wait on the workflow's row (status WAITING) and lets the lease go, and a
claim takes the run again once its timer is due or a message on its topic arrives;
the replay comes back to the same wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import IntegrityError, transaction
from django.utils import timezone

from .. import encoding
from ..bus import (
    announce,
    event_topic,
    message_topic,
    poll_interval,
    queue_topic,
    subscribe,
    workflow_topic,
)
from ..conf import get_config
from ..db import take_write_lock
from ..exceptions import MessageTimeout, NotInWorkflow, Suspended, WorkflowNotFound
from ..models import Event, Message, Step, Workflow
from .execution import (
    Execution,
    current_execution,
    library_statements,
    record_checkpoint,
)

T = TypeVar("T")

SLEEP = "durable_streams.sleep"
SEND = "durable_streams.send"
RECV = "durable_streams.recv"
SET_EVENT = "durable_streams.set_event"

MAX_NAME_LENGTH = 255


# Checking arguments


def check_seconds(seconds: object, what: str = "seconds") -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(seconds).__name__}.")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"{what} must be a finite number of seconds of at least 0, not {seconds!r}."
        )
    return float(seconds)


def check_timeout(timeout: object) -> float | None:
    return None if timeout is None else check_seconds(timeout, "timeout")


def check_name(what: str, value: object, *, optional: bool) -> str | None:
    """A topic, an idempotency key or an event key: a non-empty str of at most 255 characters."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        allowed = "None or " if optional else ""
        raise ValueError(
            f"{what} must be {allowed}a non-empty str of at most {MAX_NAME_LENGTH} characters, "
            f"not {value!r}."
        )
    return encoding.check_text(what, value)


def encode_value(value: Any, what: str) -> str:
    """JSON text of a message or event value, under the stream values' size limit."""
    text = encoding.encode(value, what)
    size = len(text.encode("utf-8"))
    limit = get_config().MAX_VALUE_BYTES
    if size > limit:
        raise ValueError(
            f"{what} is {size} bytes once encoded; the limit is {limit} "
            "(settings.DURABLE_STREAMS['MAX_VALUE_BYTES'])."
        )
    return text


def _body(function: str) -> Execution:
    execution = current_execution()
    if execution is None or execution.step_name is not None:
        raise NotInWorkflow(
            f"{function}() can only be called from a workflow body, not from a step or "
            "outside a workflow."
        )
    return execution


def _recorded_step(execution: Execution, operation: int, what: str) -> Step:
    with library_statements(execution, f"reading the record of {what}"):
        return Step.objects.using(execution.using).get(
            workflow_id=execution.workflow_id, operation=operation
        )


def _wait_in_place(
    execution: Execution,
    topics: list[str],
    attempt: Callable[[], T | None],
    until: float | None,
    what: str,
    *,
    suspend: tuple[int, str | None] | None = None,
    suspend_after: float = 0.0,
) -> T | None:
    """Call ``attempt`` until it returns something, or until the wall-clock time ``until``.

    Woken by ``topics``, by a change of the workflow (a cancel) and by a stop of the
    run; between two wake-ups at most the poll interval passes. A cancel or a lost
    lease ends the run here at once.

    With ``suspend`` (the operation, and the recv's topic or None for a sleep), a wait
    still going after ``suspend_after`` seconds, with more than ``SUSPEND_AFTER_SECONDS``
    left, raises ``Suspended``: the worker leaves the run WAITING and frees its slot.
    """
    using = execution.using
    threshold = get_config().SUSPEND_AFTER_SECONDS
    suspend_at = time.time() + suspend_after
    with (
        subscribe([*topics, workflow_topic(execution.workflow_id)]) as waiter,
        execution.stop.watched_by(waiter.ring),
    ):
        interval = poll_interval(using)
        while True:
            waiter.clear()
            execution.check_stop()
            with library_statements(execution, what):
                held = (
                    Workflow.objects.using(using)
                    .held_by(execution.worker_id)
                    .filter(pk=execution.workflow_id)
                    .exists()
                )
                if not held:
                    execution.lease_lost()
                result = attempt()
            if result is not None:
                return result
            now = time.time()
            left = math.inf if until is None else until - now
            if left <= 0:
                return None
            if suspend is not None and now >= suspend_at and left > threshold:
                # What arrives from now on finds the run WAITING: the claim sees it.
                execution.flush()
                raise Suspended(suspend[0], suspend[1], until)
            wait = min(interval, left)
            if suspend is not None and suspend_at > now:
                wait = min(wait, suspend_at - now)
            waiter.wait(wait)


# Sleep


def sleep(seconds: float) -> None:
    """Sleep ``seconds``; in a workflow body a durable timer.

    The body's wake time is recorded: a replay after a crash or a restart waits only
    for what is left of it. Outside a workflow, and in a step, a plain sleep.
    """
    seconds = check_seconds(seconds)
    execution = current_execution()
    if execution is None or execution.step_name is not None:
        time.sleep(seconds)
        return
    execution.check_stop()
    operation, replaying = execution.take_operation("sleep", "")
    if replaying:
        step = _recorded_step(execution, operation, "sleep()")
        wake_at = float(encoding.loads(step.output or "{}")["wake_at"])
    else:
        wake_at = time.time() + seconds
        record_checkpoint(
            execution,
            operation,
            SLEEP,
            Step.Outcome.SUCCESS,
            encoding.dumps({"wake_at": wake_at, "seconds": seconds}),
            None,
            1,
            timezone.now(),
        )
    # A sleep longer than the threshold is suspended at once: nothing can end it early.
    _wait_in_place(execution, [], lambda: None, wake_at, "sleeping", suspend=(operation, None))


# Messages


def _insert_message(
    using: str,
    destination: str,
    topic: str,
    text: str,
    idempotency_key: str | None,
    sender: str | None,
    sender_operation: int | None,
) -> bool:
    """Store one message; False if one with its idempotency key is already stored.

    Call inside a transaction: the insert has a savepoint of its own, so that a
    repeated key leaves the caller's transaction usable.
    """
    messages = Message.objects.using(using)
    queue = Workflow.objects.using(using).filter(pk=destination).values_list("queue", flat=True)
    destination_queue = queue.first()
    if destination_queue is None:
        raise WorkflowNotFound(destination)
    if idempotency_key is not None and (
        messages.filter(destination_id=destination, idempotency_key=idempotency_key).exists()
    ):
        return False
    try:
        with transaction.atomic(using=using):
            messages.create(
                destination_id=destination,
                topic=topic,
                value=text,
                idempotency_key=idempotency_key,
                sender_id=sender,
                sender_operation=sender_operation,
            )
    except IntegrityError:
        # Another sender stored the same key meanwhile.
        if idempotency_key is not None and (
            messages.filter(destination_id=destination, idempotency_key=idempotency_key).exists()
        ):
            return False
        raise
    # The queue's topic too: a run suspended in its recv is claimed again at once.
    announce([message_topic(destination), queue_topic(destination_queue)], using)
    return True


def send(
    using: str,
    destination: str,
    message: Any,
    topic: str | None,
    idempotency_key: str | None,
) -> None:
    """``durable_streams.send`` once its arguments are checked (the API checks the id)."""
    topic_text = check_name("topic", topic, optional=True) or ""
    key = check_name("idempotency_key", idempotency_key, optional=True)
    text = encode_value(message, f"A message to workflow {destination!r}")
    execution = current_execution()
    if execution is None or execution.step_name is not None:
        # Outside a workflow, and from a step (at-least-once, like the step itself).
        with transaction.atomic(using=using):
            take_write_lock(using)
            _insert_message(using, destination, topic_text, text, key, None, None)
        return
    execution.check_stop()
    operation, replaying = execution.take_operation("send", "")
    if replaying:
        return
    execution.flush()
    started = timezone.now()
    with (
        library_statements(execution, f"sending a message to workflow {destination!r}"),
        transaction.atomic(using=execution.using),
    ):
        execution.fence()
        _insert_message(
            execution.using,
            destination,
            topic_text,
            text,
            key,
            execution.workflow_id,
            operation,
        )
        _checkpoint_in_transaction(execution, operation, SEND, None, started)


def _checkpoint_in_transaction(
    execution: Execution, operation: int, name: str, output: str | None, started: Any
) -> None:
    Step(
        workflow_id=execution.workflow_id,
        operation=operation,
        name=name,
        status=Step.Outcome.SUCCESS,
        output=output,
        attempts=1,
        started_at=started,
        finished_at=timezone.now(),
    ).save(using=execution.using, force_insert=True)
    execution.history[operation] = (name.rsplit(".", 1)[1], "")


def recv(topic: str | None = None, *, timeout: float | None = None) -> Any:
    """The next message sent to this workflow on ``topic``, in send order.

    Each message is received once: a replay returns the same message at the same
    point. With ``timeout``, ``MessageTimeout`` when none arrives in time, recorded so
    that a replay raises it again there.
    """
    topic_text = check_name("topic", topic, optional=True) or ""
    seconds = check_timeout(timeout)
    execution = _body("recv")
    execution.check_stop()
    operation, replaying = execution.take_operation("recv", "")
    if replaying:
        step = _recorded_step(execution, operation, "recv()")
        if step.status == Step.Outcome.SUCCESS:
            return encoding.loads(step.output or "null")
        record = encoding.loads(step.error or "{}")
        raise MessageTimeout(execution.workflow_id, topic, float(record.get("timeout", 0)))
    execution.flush()
    started = timezone.now()
    using = execution.using

    def take() -> tuple[Any] | None:
        pending = Message.objects.using(using).pending(execution.workflow_id, topic_text)
        row = pending.values_list("pk", "value").first()
        if row is None:
            return None
        pk, text = row
        with transaction.atomic(using=using):
            execution.fence()
            Message.objects.using(using).filter(pk=pk, consumed_operation__isnull=True).update(
                consumed_operation=operation, consumed_at=timezone.now()
            )
            _checkpoint_in_transaction(execution, operation, RECV, text, started)
        return (encoding.loads(text),)

    until = None if seconds is None else time.time() + seconds
    resumed = execution.suspended_wait
    if resumed is not None and resumed[0] == operation:
        # Woken from its suspension: the deadline counts from the first run's recv.
        until = resumed[1]
    what = f"waiting for a message on topic {topic!r}"
    received = _wait_in_place(
        execution,
        [message_topic(execution.workflow_id)],
        take,
        until,
        what,
        suspend=(operation, topic_text),
        suspend_after=get_config().SUSPEND_AFTER_SECONDS,
    )
    if received is not None:
        return received[0]
    assert seconds is not None
    error = MessageTimeout(execution.workflow_id, topic, seconds)
    record = {"type": "MessageTimeout", "message": str(error), "traceback": ""}
    record["timeout"] = repr(seconds)
    record_checkpoint(execution, operation, RECV, Step.Outcome.ERROR, None, record, 1, started)
    raise error


# Events


def _store_event(using: str, workflow_id: str, key: str, text: str, operation: int | None) -> None:
    events = Event.objects.using(using).filter(workflow_id=workflow_id, key=key)
    now = timezone.now()
    # Only the workflow's own thread sets its events: no other writer races this.
    if not events.update(value=text, operation=operation, updated_at=now):
        Event.objects.using(using).create(
            workflow_id=workflow_id, key=key, value=text, operation=operation, updated_at=now
        )
    announce([event_topic(workflow_id)], using)


def set_event(key: str, value: Any) -> None:
    """Publish ``value`` under ``key`` for ``get_event``; setting a key again replaces it.

    From the workflow body exactly-once, like a stream write; from a step at once.
    """
    key_text = check_name("key", key, optional=False)
    assert key_text is not None
    text = encode_value(value, f"The value of event {key_text!r}")
    execution = current_execution()
    if execution is None:
        raise NotInWorkflow("set_event() can only be called from a workflow, or from its steps.")
    if execution.step_name is not None:
        with transaction.atomic(using=execution.using):
            take_write_lock(execution.using)
            _store_event(execution.using, execution.workflow_id, key_text, text, None)
        return
    execution.check_stop()
    operation, replaying = execution.take_operation("set_event", "")
    if replaying:
        return
    execution.flush()
    started = timezone.now()
    with (
        library_statements(execution, f"setting event {key_text!r}"),
        transaction.atomic(using=execution.using),
    ):
        execution.fence()
        _store_event(execution.using, execution.workflow_id, key_text, text, operation)
        _checkpoint_in_transaction(execution, operation, SET_EVENT, None, started)


def read_event(using: str, workflow_id: str, key: str) -> tuple[Any] | None:
    """The event's latest value (in a tuple), or None while it is not set.

    ``WorkflowNotFound`` if there is no such workflow.
    """
    text = (
        Event.objects.using(using)
        .filter(workflow_id=workflow_id, key=key)
        .values_list("value", flat=True)
        .first()
    )
    if text is not None:
        return (encoding.loads(text),)
    if not Workflow.objects.using(using).filter(pk=workflow_id).exists():
        raise WorkflowNotFound(workflow_id)
    return None
