"""The wake-up path: how a committed change reaches everyone who waits for it.

A *doorbell*, never a data channel: a waiter that is woken re-reads the database, and
every wait is bounded, so a lost notification costs latency, never a value.

Whoever commits a change calls one function once: ``publish_streams`` (the writer,
for a batch of stream values and closes), ``publish_changes`` (what a queryset method
changed: queues with work, workflows that ended or were resumed) or ``announce``
(topics alone: messages, events). After the commit it goes out on every transport
the deployment has:

- ``local``: the waiters of this process, at once: threads and event loops
  (``subscribe``), and the live feeds of WebSocket and SSE readers, one shared
  subscription per event loop and topic (``subscribe_on_loop``);
- ``database``: other processes, on a database that carries notifications
  (PostgreSQL's LISTEN/NOTIFY), from a notifier thread, heard by a listener thread
  that rings the same local hub there;
- ``layer``: the channel layer, which also carries small stream values to the live
  feeds; a feed that a healthy layer serves drops the doorbells that layer covers.

Elsewhere waiters in other processes poll every ``POLL_INTERVAL`` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from django.db import transaction

from . import layer
from .database import (
    ensure_listener,
    flush_notifications,
    listener_started,
    notifier,
    poll_interval,
    stop_listeners,
    uses_listen_notify,
)
from .local import (
    Waiter,
    event_topic,
    hub,
    message_topic,
    queue_topic,
    stream_topic,
    subscribe,
    subscribe_on_loop,
    watched_topics,
    workflow_topic,
)

if TYPE_CHECKING:
    from ..models import Changes

logger = logging.getLogger("durable_streams.bus")

__all__ = [
    "StreamCommitted",
    "Waiter",
    "announce",
    "event_topic",
    "ensure_listener",
    "flush_notifications",
    "listener_started",
    "message_topic",
    "poll_interval",
    "publish_changes",
    "publish_streams",
    "queue_topic",
    "stop_listeners",
    "stream_topic",
    "subscribe",
    "subscribe_on_loop",
    "uses_listen_notify",
    "watched_topics",
    "workflow_topic",
]


class StreamCommitted(NamedTuple):
    """Values, or a close, that one stream gained in a committed batch."""

    workflow_id: str
    key: str
    first: int  # the offset of the first value
    texts: list[str]  # the values, as JSON; empty for a close
    closed_length: int | None  # None for values; the stream's length for a close


def publish_streams(changes: Sequence[StreamCommitted], using: str) -> None:
    """Tell every reader what a batch of stream writes changed; call it after the commit.

    One call per batch: it rings the streams' topics (this process's waiters and feeds,
    and other processes through the database where it notifies), then hands the values
    to the channel layer, values before closes, so that no reader sees a close before
    the last value. Never raises: a reader that hears nothing reads the database later.
    """
    if not changes:
        return
    announce([stream_topic(change.workflow_id, change.key) for change in changes], using)
    for change in sorted(changes, key=lambda c: c.closed_length is not None):
        try:
            if change.closed_length is None:
                layer.entries_committed(change.workflow_id, change.key, change.first, change.texts)
            else:
                layer.stream_closed(change.workflow_id, change.key, change.closed_length)
        except Exception:
            logger.exception(
                "[%s] Live delivery of stream %r failed; readers catch up.",
                change.workflow_id,
                change.key,
            )


def announce(topics: Iterable[str], using: str) -> None:
    """Ring ``topics`` in every process once the current transaction commits.

    Outside a transaction, at once.
    """
    topics = list(dict.fromkeys(topics))
    if not topics:
        return
    send = uses_listen_notify(using)

    def ring() -> None:
        for topic in topics:
            hub.ring(topic)
        if send:
            notifier(using).send(topics)

    transaction.on_commit(ring, using=using)


def publish_changes(changes: Changes, using: str) -> None:
    """Tell every waiter what a queryset method changed, once the current transaction commits.

    Outside a transaction, at once. Idle workers hear of the queues with new work;
    result waiters, Python readers and live feeds hear of the workflows that ended or
    were resumed. Whoever asks a queryset for a change calls this with its result.
    """
    announce(
        [queue_topic(queue) for queue in changes.queues]
        + [workflow_topic(workflow_id) for workflow_id, _ in changes.ended]
        # A resumed workflow's interrupted streams reopen: their live feeds read on.
        + [workflow_topic(workflow_id) for workflow_id in changes.resumed],
        using,
    )
    for workflow_id, status in changes.ended:
        transaction.on_commit(partial(layer.workflow_ended, workflow_id, status), using=using)
    if changes.resumed:
        resumed = list(changes.resumed)
        transaction.on_commit(partial(layer.workflows_resumed, resumed), using=using)
