"""The live feed of one stream for one reader: every value from an offset, then the end.

A feed subscribes, before its first database read, to this event loop's share of
the local hub (``bus.local.subscribe_on_loop``: the doorbells that Python waiters
hear too, from this process's commits and, through LISTEN/NOTIFY, from other
processes') and of the channel layer (``bus.layer``). It takes the values that
layer messages carry when they follow on, and reads the database after a gap, a
lost message, a doorbell that no healthy layer covers, or a silence; without
either it polls every ``POLL_INTERVAL`` seconds. One value pushed to a thousand
sockets costs no query at all.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, close_old_connections

from ..bus import (
    ensure_listener,
    layer,
    listener_started,
    stream_topic,
    subscribe_on_loop,
    uses_listen_notify,
    workflow_topic,
)
from ..bus.layer import (
    CLOSED,
    ENDED,
    ENTRIES,
    RESUMED,
    Throttled,
    loops,
    stream_group,
    workflow_group,
)
from ..conf import get_config
from ..db import alias
from ..retry import ReadRetry
from .protocol import entry_frame

if TYPE_CHECKING:
    from ..auth import ReaderAccess
    from ..bus.layer import _Hub

logger = logging.getLogger("durable_streams.web.feed")

T = TypeVar("T")

# A pushed subscriber that hears nothing re-reads the database after
# NOTIFY_FALLBACK_POLL seconds, then after twice that, and so on up to this.
SILENCE_CEILING = 15.0
# Stands for the messages a feed dropped: it reads the database instead.
LAGGED = "durable_streams.lagged"
# A ring of the feed's stream or workflow topic on the local hub (a commit in this
# process, or a notification from another): it carries no values, the feed reads them.
DOORBELL = "durable_streams.doorbell"
_DOORBELL_NOTE: dict[str, Any] = {"type": DOORBELL}
# Messages a feed keeps while its reader does not pull (a WebSocket with a full
# window, a slow SSE client); past this it drops them and reads the database later.
MAX_NOTES = 64


class Entry(NamedTuple):
    offset: int
    text: str  # the value as stored: JSON text
    # Its WebSocket frame, when it came in a channel layer message: encoded once for
    # every local reader of the stream (``entry_frame``), not once per socket.
    frame: str | None = None


@dataclass(frozen=True)
class Closed:
    length: int


@dataclass(frozen=True)
class Interrupted:
    """The stream's workflow failed or was cancelled after ``length`` values.

    Not an end: a resumed workflow reopens the stream, and the feed follows it on.
    """

    length: int
    status: str


@dataclass(frozen=True)
class Revoked:
    """The reader may no longer read the stream: its access, checked again, failed."""


@dataclass(frozen=True)
class Batch:
    offset: int
    texts: list[str]
    length: int
    closed: bool
    # The workflow's status (ERROR or CANCELLED) when its end interrupted the stream.
    interrupted: str | None = None


def read_batch(workflow_id: str, key: str, offset: int) -> Batch:
    """Stored values from ``offset`` (at most READ_BATCH_SIZE), the length, and whether it ended.

    A stream that does not exist yet is empty; it has ended once its workflow has.
    ``closed`` is a final close; an interruption (``interrupted``) is not.
    """
    # Imported here: the models need the app registry, and this module is imported by
    # the routing that an ASGI module may load before Django is set up.
    from ..models import Stream, StreamEntry

    using = alias()
    position = Stream.objects.using(using).position(workflow_id, key)
    if position is None:  # the workflow is gone: nothing more will come
        return Batch(offset, [], 0, True)
    stream_id, length, ended, interrupted = position
    texts: list[str] = []
    if stream_id is not None and length > offset:
        limit = min(get_config().READ_BATCH_SIZE, length - offset)
        rows = StreamEntry.objects.using(using).texts_from(stream_id, offset, limit)
        texts = [text for _, text in rows]
    return Batch(offset, texts, length, ended and interrupted is None, interrupted)


async def run_db(fn: Callable[..., T], *args: Any) -> T:
    """Run a short read in a thread, on a connection that respects CONN_MAX_AGE."""

    def call() -> T:
        close_old_connections()
        try:
            return fn(*args)
        finally:
            close_old_connections()

    return await sync_to_async(call, thread_sensitive=False)()


def _outage(feed: StreamFeed) -> ReadRetry:
    """How a feed rides out a failing database (``retry.ReadRetry``): it reads again, a
    little later each time, for up to ``READER_RETRY_SECONDS`` from the first failure,
    then gives up with the last error (the socket closes with 1011, the client
    reconnects). The connection of a failed read is replaced by ``run_db`` at the next one.
    """

    def warn(exc: Exception, limit: float) -> None:
        _read_failures.warning(
            f"Could not read stream {feed.key!r} of workflow {feed.workflow_id!r}; "
            f"reading again for up to {limit}s",
            exc,
        )

    def recovered() -> None:
        logger.info("Reading stream %r of workflow %r again.", feed.key, feed.workflow_id)

    return ReadRetry(warn=warn, recovered=recovered, give_up=lambda exc, limit: exc)


_read_failures = Throttled()
# The database reads in flight on each event loop, by stream and offset, with the loop
# time each started at.
_Flight = tuple[float, "asyncio.Future[Batch]"]
_reads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, int], _Flight]]
_reads = weakref.WeakKeyDictionary()


async def _shared_read(feed: StreamFeed, subscribed_at: float) -> Batch:
    """``read_batch`` for ``feed``, shared with the feeds of this loop that need the same read.

    Sockets of one stream see a lost message or a silence at the same moment, and
    all need the values from the same offset: one query serves them all. A feed
    only shares a read that started after it subscribed, so that read sees
    everything committed before the feed could hear of it.
    """
    loop = asyncio.get_running_loop()
    reads = _reads.setdefault(loop, {})
    key = (feed.workflow_id, feed.key, feed.next_offset)
    flight = reads.get(key)
    if flight is None or flight[0] < subscribed_at:
        task = asyncio.ensure_future(run_db(read_batch, *key))
        flight = reads[key] = (loop.time(), task)
        task.add_done_callback(partial(_landed, reads, key, flight))
    return await asyncio.shield(flight[1])


def _landed(
    reads: dict[tuple[str, str, int], _Flight],
    key: tuple[str, str, int],
    flight: _Flight,
    task: asyncio.Future[Batch],
) -> None:
    if reads.get(key) is flight:
        del reads[key]
    if not task.cancelled():
        task.exception()  # retrieved: a waiter that left must not leave it unheard


def _layer_brings(hub: _Hub | None, remote: bool) -> bool:
    """Whether a healthy channel layer brings the change behind a doorbell, with its values.

    A commit of this process reaches its feeds through any layer; another process's
    only through a layer that crosses processes. Then the doorbell is dropped (in the
    ringing thread, before any per-feed work); without a layer, or while it fails,
    the doorbell makes the feeds read the database.
    """
    if hub is None or hub.failing:
        return False
    return not remote or hub.crosses


class StreamFeed:
    """The values of one stream from ``offset`` on, then its close, each exactly once.

    A stream that its workflow's failure or cancellation ended is not closed: the
    feed yields ``Interrupted`` once all its values are out, and follows on, so that
    the values a resumed run writes, and the final close, follow.

    ``events()`` subscribes the feed to this event loop's share of the channel layer
    (the stream's ``groups``, joined once per loop however many feeds read the
    stream) before its first database read, so nothing committed after that read
    is missed, and unsubscribes it when the iteration ends. Each message for the
    stream comes in through ``notify()``.
    """

    def __init__(
        self, workflow_id: str, key: str, offset: int, access: ReaderAccess | None = None
    ) -> None:
        self.workflow_id = workflow_id
        self.key = key
        self.next_offset = offset
        self.groups = [stream_group(workflow_id, key), workflow_group(workflow_id)]
        self.pushed = layer.crosses_processes(layer.channel_layer())
        # Messages not yet acted on, and the events() wait for the next one. Cheaper
        # than asyncio.wait_for on a queue (a task per wait), which showed per value
        # and socket in fan-out profiles.
        self._notes: collections.deque[dict[str, Any]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._length: int | None = None  # known once the stream is closed
        # Whether the reader was told that the stream is interrupted (and not since
        # seen it open again).
        self._interrupted = False
        self.fetches = 0
        # Checked again every REAUTHORIZE_SECONDS while events() runs: by a timer and a
        # short task per check, so that an idle reader is ended too and no value waits.
        self.access = access
        self._recheck: asyncio.TimerHandle | None = None
        self._checking: asyncio.Task[None] | None = None
        self._revoked = False
        self._check_failed: BaseException | None = None

    def notify(self, message: dict[str, Any]) -> None:
        """Hand the feed a channel layer message (on the loop that runs ``events()``)."""
        if len(self._notes) >= MAX_NOTES:
            # The reader is not keeping up: remember only that the database has more.
            self._notes.clear()
            self._notes.append({"type": LAGGED})
        self._notes.append(message)
        self._wake()

    def doorbell(self) -> None:
        """The local hub rang the stream's topic or its workflow's: read the database."""
        if self._notes and self._notes[-1] is _DOORBELL_NOTE:
            return  # one read answers every ring not yet acted on
        self.notify(_DOORBELL_NOTE)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm_recheck(self, first: bool = False) -> None:
        delay = get_config().REAUTHORIZE_SECONDS
        if first:
            # Readers that connected together (after a restart, say) would otherwise be
            # checked together for ever: a first check somewhat early spreads them.
            delay *= random.uniform(0.5, 1.0)
        self._recheck = asyncio.get_running_loop().call_later(delay, self._recheck_due)

    def _recheck_due(self) -> None:
        self._recheck = None
        self._checking = asyncio.ensure_future(self._reauthorize())

    async def _reauthorize(self) -> None:
        assert self.access is not None
        try:
            allowed = await run_db(self.access.still_allowed)
        except Exception as exc:
            # Fail closed: the reader ends with a server error, and reconnects.
            self._check_failed = exc
        else:
            if allowed:
                self._arm_recheck()
                return
            self._revoked = True
        self._wake()

    async def _next_note(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None after ``timeout`` seconds without one."""
        if self._revoked or self._check_failed is not None:
            return None  # events() ends the feed now
        if not self._notes:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + timeout
            waiter = self._waiter = loop.create_future()
            # One timer per silence, not per message: when it fires early (messages
            # came meanwhile and moved the deadline on) it sets itself again.
            timer = self._timer
            if timer is None or timer.when() > self._deadline:  # none, or set for longer
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(self._deadline, self._silence_timer)
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._notes:
                return None
        return self._notes.popleft()

    def wake(self) -> None:
        """End the current wait as a silence would: the layer failed, read the database now."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _silence_timer(self) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter
        if waiter is None:  # not waiting: the next wait sets a timer of its own
            self._timer = None
        elif loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._silence_timer)
        else:
            self._timer = None
            if not waiter.done():
                waiter.set_result(None)

    def _take(self, offset: int, texts: list[str], frames: list[str] | None = None) -> list[Entry]:
        """The entries of a contiguous run from ``offset`` that the reader still needs."""
        skip = self.next_offset - offset
        if skip < 0 or skip >= len(texts):
            return []
        if frames is None:
            fresh = [Entry(offset + i, texts[i]) for i in range(skip, len(texts))]
        else:
            fresh = [Entry(offset + i, texts[i], frames[i]) for i in range(skip, len(texts))]
        self.next_offset = offset + len(texts)
        return fresh

    def _apply(self, note: dict[str, Any]) -> tuple[list[Entry], bool]:
        """Act on one message: the entries it delivers, and whether to read the database."""
        kind = note.get("type")
        if kind in (LAGGED, DOORBELL):
            return [], True
        if kind == ENTRIES:
            offset, count, values = note["offset"], note["count"], note.get("values")
            if offset + count <= self.next_offset:
                return [], False
            if values is None or offset > self.next_offset:
                return [], True  # a value too big to travel, or a lost message
            frames = note.get("frames")
            if frames is None:
                # Every local reader of the stream gets this same message: its frames
                # are encoded once, by the first, for all.
                key = note["key"]
                frames = note["frames"] = [
                    entry_frame(key, offset + i, text) for i, text in enumerate(values)
                ]
            return self._take(offset, values, frames), False
        if kind == CLOSED:
            self._length = note["length"]
        elif kind == ENDED:
            lengths = note.get("lengths")
            if lengths is None or note.get("status") != "SUCCESS":
                # Without the lengths, or after a failure or a cancellation (which
                # streams were closed for good, and which interrupted?): the database says.
                return [], True
            self._length = lengths.get(self.key, 0)
        elif kind == RESUMED:
            return [], True  # an interrupted stream may be open again
        return [], self._length is not None and self.next_offset < self._length

    def _done(self) -> bool:
        return self._length is not None and self.next_offset >= self._length

    async def events(self) -> AsyncGenerator[Entry | Closed | Interrupted | Revoked, None]:
        config = get_config()
        if self.pushed:
            base, ceiling = (
                config.NOTIFY_FALLBACK_POLL,
                max(config.NOTIFY_FALLBACK_POLL, SILENCE_CEILING),
            )
        else:
            base = ceiling = config.POLL_INTERVAL
        silence = base
        behind = True
        outage = _outage(self)
        hub = layer.local_hub()
        using = alias()
        if uses_listen_notify(using) and not listener_started(using):
            # Other processes' commits reach this one's hub through the listener.
            await sync_to_async(ensure_listener, thread_sensitive=False)(using)
        topics = [stream_topic(self.workflow_id, self.key), workflow_topic(self.workflow_id)]
        with (
            loops.attached(asyncio.get_running_loop()),
            subscribe_on_loop(topics, self, muted=partial(_layer_brings, hub)),
        ):
            try:
                # Subscribed to the doorbells (above) and the layer before the first
                # read: what commits after it is heard.
                if hub is not None:
                    await hub.subscribe(self)
                subscribed_at = asyncio.get_running_loop().time()
                if self.access is not None:
                    self._arm_recheck(first=True)
                while True:
                    if self._check_failed is not None:
                        raise self._check_failed
                    if self._revoked:
                        yield Revoked()
                        return
                    if behind:
                        self.fetches += 1
                        try:
                            batch = await _shared_read(self, subscribed_at)
                        except (OperationalError, InterfaceError) as exc:
                            await asyncio.sleep(outage.failed(exc))
                            continue
                        outage.succeeded()
                        for entry in self._take(batch.offset, batch.texts):
                            yield entry
                        if batch.closed:
                            self._length = batch.length
                        # More stored than one batch holds: read on (an empty read ends it).
                        behind = bool(batch.texts) and batch.length > self.next_offset
                        if batch.interrupted is None:
                            self._interrupted = False
                        elif not (behind or self._interrupted) and (
                            self.next_offset >= batch.length
                        ):
                            # Said once per interruption; the feed follows on, for a resume.
                            self._interrupted = True
                            yield Interrupted(batch.length, batch.interrupted)
                    if self._done():
                        yield Closed(self._length or 0)
                        return
                    if behind:
                        continue
                    # Nothing is pushed while the layer fails: poll as without one
                    # meanwhile (the hub wakes the feeds when it starts failing).
                    failing = hub is not None and hub.failing
                    note = await self._next_note(config.POLL_INTERVAL if failing else silence)
                    if note is None:
                        behind = True
                        if not failing:
                            silence = min(silence * 2, ceiling)
                        continue
                    silence = base
                    entries, behind = self._apply(note)
                    for entry in entries:
                        yield entry
            finally:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if self._recheck is not None:
                    self._recheck.cancel()
                    self._recheck = None
                if self._checking is not None:
                    self._checking.cancel()
                    self._checking = None
                if hub is not None:
                    await hub.unsubscribe(self)


# The subscriptions of this process: one per event loop and channel layer
