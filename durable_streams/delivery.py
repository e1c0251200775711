"""Push of committed stream changes to live subscribers (WebSocket and SSE clients).

The runtime and the models call the hooks below after the transaction that stored the
change commits, in the writing process. They hand a small message to the channel
layer and return at once; they never raise into the workflow.

Each event loop that serves readers holds one subscription to the channel layer
(``_Hub``): one layer channel, which joins the groups of every stream that a local
reader follows, and one task that receives from it and hands each message to the
local readers of that stream. A thousand sockets on one stream in one process are
one group member, so the layer stores and delivers each message once per process,
not once per socket.

The channel layer drops messages when a channel is full (at-most-once), so it is
only a doorbell that happens to carry small values. A subscriber (``StreamFeed``)
numbers every value by offset: it sends what follows on directly, fills a gap from
the database, and re-reads the database after a silence. One value pushed to a
thousand sockets costs no query at all.

Without a channel layer that reaches other processes (none configured, or the
in-memory one while workers run in their own processes), subscribers find new
values by polling the database every ``POLL_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, close_old_connections

from . import encoding
from .conf import get_config
from .db import alias

if TYPE_CHECKING:
    from .auth import ReaderAccess

logger = logging.getLogger("durable_streams.delivery")

T = TypeVar("T")

# Messages whose values add up to more characters than this go out without them:
# the subscribers read those values from the database.
INLINE_LIMIT = 16 * 1024
# A pushed subscriber that hears nothing re-reads the database after
# NOTIFY_FALLBACK_POLL seconds, then after twice that, and so on up to this.
SILENCE_CEILING = 15.0
# Messages waiting for the sender thread; beyond this the oldest are dropped
# (subscribers catch up from the database).
MAX_PENDING = 10_000
# Streams whose final lengths travel in the message announcing a workflow's end.
MAX_ENDED_LENGTHS = 100
# After a failure to receive from the channel layer, or to join a group, try again
# after this many seconds, doubling up to the second figure (short: push resumes
# within that long once the layer is back).
RETRY_FIRST, RETRY_CEILING = 0.05, 1.0
# A receive that has waited this long without failing means the layer is reachable.
RECEIVE_HEALTHY_AFTER = 0.5

ENTRIES = "durable_streams.entries"
CLOSED = "durable_streams.closed"
ENDED = "durable_streams.ended"
# A failed or cancelled workflow was resumed: its interrupted streams are open again.
RESUMED = "durable_streams.resumed"
# Stands for the messages a feed dropped: it reads the database instead.
LAGGED = "durable_streams.lagged"
# Messages a feed keeps while its reader does not pull (a WebSocket with a full
# window, a slow SSE client); past this it drops them and reads the database later.
MAX_NOTES = 64


def _digest(*parts: str) -> str:
    data = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def stream_group(workflow_id: str, key: str) -> str:
    """The channel layer group of one stream's subscribers (names must be short ASCII)."""
    return f"durable-streams.s.{_digest(workflow_id, key)}"


def workflow_group(workflow_id: str) -> str:
    """The group told when the workflow ends (its streams end) or is resumed (they reopen)."""
    return f"durable-streams.w.{_digest(workflow_id)}"


# The channel layer


class ChannelLayer(Protocol):
    """The part of a channels layer that durable_streams uses (channels has no type hints)."""

    async def send(self, channel: str, message: dict[str, Any]) -> None: ...

    async def receive(self, channel: str) -> dict[str, Any]: ...

    async def new_channel(self, prefix: str = ...) -> str: ...

    async def group_add(self, group: str, channel: str) -> None: ...

    async def group_discard(self, group: str, channel: str) -> None: ...

    async def group_send(self, group: str, message: dict[str, Any]) -> None: ...


def channel_layer() -> ChannelLayer | None:
    """The default channel layer, or None without channels or CHANNEL_LAYERS."""
    try:  # channels is optional (the channels extra)
        from channels.layers import get_channel_layer
    except ImportError:
        return None
    layer: ChannelLayer | None = get_channel_layer()
    return layer


def crosses_processes(layer: ChannelLayer | None) -> bool:
    """Whether a message sent on ``layer`` reaches other processes."""
    if layer is None:
        return False
    # channels is optional (the channels extra); a layer exists only when it is installed.
    from channels.layers import InMemoryChannelLayer

    return not isinstance(layer, InMemoryChannelLayer)


class _Loops:
    """Event loops of this process that have subscribers (for the in-memory layer).

    The in-memory layer's queues belong to the loop of their consumers and are not
    thread-safe: a worker thread must send on that loop, not on its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[asyncio.AbstractEventLoop, int] = {}

    @contextlib.contextmanager
    def attached(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        with self._lock:
            self._counts[loop] = self._counts.get(loop, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._counts.get(loop, 1) - 1
                if left:
                    self._counts[loop] = left
                else:
                    self._counts.pop(loop, None)

    def current(self) -> list[asyncio.AbstractEventLoop]:
        with self._lock:
            return list(self._counts)


loops = _Loops()


class _Throttled:
    """Logs a recurring failure once per ``every`` seconds, with the count in between."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last = -every
        self._count = 0

    def warning(self, message: str, exc: BaseException | None) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.every:
                return
            self._last, count, self._count = now, self._count, 0
        logger.warning("%s (%d times since the last report): %r", message, count, exc)


_send_failures = _Throttled()


def _spawn_send(layer: ChannelLayer, group: str, message: dict[str, Any]) -> None:
    # Runs on the subscribers' loop: the coroutine is created where it is awaited.
    task = asyncio.ensure_future(layer.group_send(group, message))
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _send_failures.warning("Could not notify stream subscribers", task.exception())


# A message for a group of a layer, waiting for the sender thread.
_Outgoing = tuple[ChannelLayer, str, dict[str, Any]]


class _Sender:
    """Sends messages on a cross-process layer from one thread with its own loop.

    Writers never wait for the layer's network round trip, messages keep their
    order, and the layer's connections are reused from one message to the next.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Outgoing] | None = None
        self._pid = 0
        self._pending = 0
        self._dropped = 0

    def _ensure(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Outgoing]]:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(ready,), name="durable-streams-delivery", daemon=True
                )
                thread.start()
                if not ready.wait(5.0):
                    raise RuntimeError("the delivery thread did not start")
                self._pid = os.getpid()
            assert self._loop is not None and self._queue is not None
            return self._loop, self._queue

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._queue = asyncio.Queue()
        self._loop = loop
        ready.set()
        loop.run_until_complete(self._serve())

    def put(self, layer: ChannelLayer, group: str, message: dict[str, Any]) -> None:
        loop, queue = self._ensure()
        with self._lock:
            if self._pending >= MAX_PENDING:
                self._dropped += 1
                if self._dropped % 1000 == 1:
                    logger.warning(
                        "The channel layer is too slow: %d notifications dropped; "
                        "subscribers catch up from the database.",
                        self._dropped,
                    )
                return
            self._pending += 1
        loop.call_soon_threadsafe(queue.put_nowait, (layer, group, message))

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            with self._lock:
                self._pending -= len(batch)
            for layer, group, message in _coalesce(batch):
                try:
                    await layer.group_send(group, message)
                except Exception as exc:
                    # Subscribers catch up from the database; say so without flooding the log.
                    _send_failures.warning("Could not notify stream subscribers", exc)

    def flush(self, timeout: float) -> None:
        """Wait (bounded) until queued messages are sent; called at exit."""
        deadline = time.monotonic() + timeout
        while self._loop is not None and self._pid == os.getpid() and time.monotonic() < deadline:
            with self._lock:
                if self._pending <= 0 and self._queue is not None and self._queue.empty():
                    break
            time.sleep(0.01)


def _coalesce(
    batch: list[_Outgoing],
) -> list[_Outgoing]:
    """Merge back-to-back entries of one stream into one message, keeping each group's order."""
    out: list[_Outgoing] = []
    last: dict[str, int] = {}
    for layer, group, message in batch:
        index = last.get(group)
        if index is not None and message["type"] == ENTRIES:
            previous = out[index][2]
            if (
                previous["type"] == ENTRIES
                and previous["values"] is not None
                and message["values"] is not None
                and previous["offset"] + previous["count"] == message["offset"]
                and _size(previous["values"]) + _size(message["values"]) <= INLINE_LIMIT
            ):
                merged = {
                    **previous,
                    "count": previous["count"] + message["count"],
                    "values": previous["values"] + message["values"],
                }
                out[index] = (layer, group, merged)
                continue
        last[group] = len(out)
        out.append((layer, group, message))
    return out


def _size(values: list[str]) -> int:
    return sum(len(v) for v in values)


_sender = _Sender()
atexit.register(_sender.flush, 2.0)


def publish(group: str, message: dict[str, Any]) -> None:
    """Hand ``message`` to the channel layer's ``group`` without waiting; never raises."""
    try:
        layer = channel_layer()
        if layer is None:
            return
        if crosses_processes(layer):
            _sender.put(layer, group, message)
            return
        for loop in loops.current():
            with contextlib.suppress(RuntimeError):  # a loop that closed meanwhile
                loop.call_soon_threadsafe(_spawn_send, layer, group, message)
    except Exception as exc:
        _send_failures.warning("Could not notify stream subscribers", exc)


# The hooks the runtime calls after commit


def entries_committed(workflow_id: str, key: str, first_offset: int, values: list[str]) -> None:
    """``values`` (JSON texts) were stored at ``first_offset`` and on in stream ``key``."""
    inline = list(values) if _size(values) <= INLINE_LIMIT else None
    publish(
        stream_group(workflow_id, key),
        {
            "type": ENTRIES,
            "workflow": workflow_id,
            "key": key,
            "offset": first_offset,
            "count": len(values),
            "values": inline,
        },
    )


def stream_closed(workflow_id: str, key: str, length: int) -> None:
    """Stream ``key`` was closed with ``length`` values."""
    publish(
        stream_group(workflow_id, key),
        {"type": CLOSED, "workflow": workflow_id, "key": key, "length": length},
    )


def workflows_resumed(workflow_ids: list[str]) -> None:
    """These workflows were sent back to the queue: their interrupted streams reopened."""
    for workflow_id in workflow_ids:
        publish(workflow_group(workflow_id), {"type": RESUMED, "workflow": workflow_id})


def _final_lengths(workflow_id: str) -> dict[str, int] | None:
    # Imported here: the models need the app registry, and this module is imported by
    # the routing that an ASGI module may load before Django is set up.
    from .models import Stream

    try:
        rows = list(
            Stream.objects.using(alias())
            .filter(workflow_id=workflow_id)
            .values_list("key", "length")[: MAX_ENDED_LENGTHS + 1]
        )
    except Exception:
        # Subscribers without the lengths read them from the database.
        logger.warning("Could not read the final stream lengths.", exc_info=True)
        return None
    return dict(rows) if len(rows) <= MAX_ENDED_LENGTHS else None


def workflow_ended(workflow_id: str, status: str | None = None) -> None:
    """The workflow reached final ``status``; every stream it had is closed or interrupted now."""
    try:
        layer = channel_layer()
    except Exception as exc:
        _send_failures.warning("Could not notify stream subscribers", exc)
        return
    if layer is None or not (crosses_processes(layer) or loops.current()):
        return  # nobody could hear it: spare the query for the lengths
    # Only a success closes every stream for good: after a failure or a cancellation
    # the subscribers read which streams were closed, and which interrupted.
    lengths = _final_lengths(workflow_id) if status == "SUCCESS" else None
    publish(
        workflow_group(workflow_id),
        {"type": ENDED, "workflow": workflow_id, "status": status, "lengths": lengths},
    )


# The subscriber side


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
    from .models import Stream, StreamEntry

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


class _Outage:
    """How a feed rides out a failing database: it reads again, a little later each
    time, for up to ``READER_RETRY_SECONDS`` from the first failure, then gives up
    with the last error (the socket closes with 1011, the client reconnects). The
    connection of a failed read is replaced by ``run_db`` at the next one.
    """

    FIRST_DELAY, MAX_DELAY = 0.1, 2.0

    def __init__(self) -> None:
        self._since: float | None = None
        self._delay = self.FIRST_DELAY

    def failed(self, exc: Exception, feed: StreamFeed) -> float:
        now = time.monotonic()
        limit = get_config().READER_RETRY_SECONDS
        if self._since is None:
            self._since, self._delay = now, self.FIRST_DELAY
            _read_failures.warning(
                f"Could not read stream {feed.key!r} of workflow {feed.workflow_id!r}; "
                f"reading again for up to {limit}s",
                exc,
            )
        if now - self._since >= limit:
            raise exc
        wait = min(self._delay, self._since + limit - now)
        self._delay = min(self._delay * 2, self.MAX_DELAY)
        return wait

    def succeeded(self, feed: StreamFeed) -> None:
        if self._since is not None:
            logger.info("Reading stream %r of workflow %r again.", feed.key, feed.workflow_id)
            self._since = None


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
        self.pushed = crosses_processes(channel_layer())
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
        if kind == LAGGED:
            return [], True
        if kind == ENTRIES:
            offset, count, values = note["offset"], note["count"], note.get("values")
            if offset + count <= self.next_offset:
                return [], False
            if values is None or offset > self.next_offset:
                return [], True  # a value too big to travel, or a lost message
            return self._take(offset, values, note.get("frames")), False
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
        outage = _Outage()
        hub = _local_hub()
        with loops.attached(asyncio.get_running_loop()):
            try:
                subscribed_at = 0.0
                if hub is not None:
                    # Subscribed before the first read: what commits after it is heard.
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
                            if hub is not None:
                                batch = await hub.read(self, subscribed_at)
                            else:
                                batch = await run_db(
                                    read_batch, self.workflow_id, self.key, self.next_offset
                                )
                        except (OperationalError, InterfaceError) as exc:
                            await asyncio.sleep(outage.failed(exc, self))
                            continue
                        outage.succeeded(self)
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


class _Membership:
    """How many local feeds need one group, and whether the hub's channel is in it."""

    __slots__ = ("count", "joined", "lock")

    def __init__(self) -> None:
        self.count = 0
        self.joined = False
        self.lock = asyncio.Lock()  # one group_add or group_discard at a time


class _Hub:
    """One event loop's subscription to the channel layer, shared by all its feeds.

    One layer channel is in the groups of every stream (and workflow) that a feed on
    this loop reads: the first feed of a stream joins them, later ones wait until
    that join has completed, the last one leaving discards them. One task receives
    from the channel and hands each message to the feeds of its stream. The layer
    therefore stores and delivers each message once per process, not once per socket.

    Feeds of one stream that need the same database read (after a lost message, or
    a silence) share one query (``read``).

    The layer forgets a group member after its ``group_expiry`` (a day by default),
    so the hub re-joins its groups every quarter of that. When receiving or joining
    fails, it tries again with a bounded backoff; meanwhile the feeds re-read the
    database after a silence, as they do after any lost message.
    """

    def __init__(self, layer: ChannelLayer) -> None:
        self.layer = layer
        self.channel: str | None = None
        self._feeds: dict[str, dict[str, set[StreamFeed]]] = {}
        self._members: dict[str, _Membership] = {}
        self._reads: dict[tuple[str, str, int], tuple[float, asyncio.Future[Batch]]] = {}
        self._opening = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._rejoin_now = asyncio.Event()
        # After a failed join, subscribers do not try again one after the other (each
        # waiting for the last): _keep_joined retries, with backoff, until one works.
        self._joins_failing = False
        self._receive_failing = False

    @property
    def failing(self) -> bool:
        """Whether the layer fails to deliver: the feeds poll meanwhile."""
        return self._receive_failing or self._joins_failing

    def _set_failing(self, *, receive: bool | None = None, joins: bool | None = None) -> None:
        was = self.failing
        if receive is not None:
            self._receive_failing = receive
        if joins is not None:
            self._joins_failing = joins
        if self.failing and not was:
            # Feeds waiting out a long silence read the database now, then poll.
            for streams in list(self._feeds.values()):
                for feeds in list(streams.values()):
                    for feed in list(feeds):
                        feed.wake()

    # The feeds' side

    async def subscribe(self, feed: StreamFeed) -> None:
        """Route the stream's messages to ``feed``; return once the layer delivers them."""
        self._feeds.setdefault(feed.workflow_id, {}).setdefault(feed.key, set()).add(feed)
        pending = []
        for name in feed.groups:
            member = self._members.get(name)
            if member is None:
                member = self._members[name] = _Membership()
            member.count += 1
            if not member.joined:
                pending.append(self._spawn(self._sync(name)))
        if pending:
            # Shielded: a feed that gives up waiting leaves the join to finish for others.
            await asyncio.gather(*(asyncio.shield(task) for task in pending))

    async def unsubscribe(self, feed: StreamFeed) -> None:
        streams = self._feeds.get(feed.workflow_id)
        feeds = streams.get(feed.key) if streams else None
        if streams is None or feeds is None or feed not in feeds:
            return
        feeds.discard(feed)
        if not feeds:
            del streams[feed.key]
            if not streams:
                del self._feeds[feed.workflow_id]
        pending = []
        for name in feed.groups:
            member = self._members.get(name)
            if member is None:
                continue
            member.count -= 1
            if member.count <= 0:
                pending.append(self._spawn(self._sync(name)))
        if pending:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(asyncio.shield(task) for task in pending))

    async def read(self, feed: StreamFeed, subscribed_at: float) -> Batch:
        """``read_batch`` for ``feed``, shared with the feeds that need the same read.

        Sockets of one stream see a lost message or a silence at the same moment, and
        all need the values from the same offset: one query serves them all. A feed
        only shares a read that started after it subscribed, so that read sees
        everything committed before the feed could hear of it.
        """
        key = (feed.workflow_id, feed.key, feed.next_offset)
        flight = self._reads.get(key)
        if flight is None or flight[0] < subscribed_at:
            started = asyncio.get_running_loop().time()
            task = asyncio.ensure_future(run_db(read_batch, *key))
            flight = self._reads[key] = (started, task)
            task.add_done_callback(lambda _: self._landed(key, flight))
        return await asyncio.shield(flight[1])

    def _landed(
        self, key: tuple[str, str, int], flight: tuple[float, asyncio.Future[Batch]]
    ) -> None:
        if self._reads.get(key) is flight:
            del self._reads[key]
        task = flight[1]
        if not task.cancelled():
            task.exception()  # retrieved: a waiter that left must not leave it unheard

    # The layer's side

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _channel(self) -> str:
        async with self._opening:
            if self.channel is None:
                self.channel = await self.layer.new_channel()
                self._background = [
                    asyncio.ensure_future(self._receive(self.channel)),
                    asyncio.ensure_future(self._keep_joined()),
                ]
            return self.channel

    async def _sync(self, name: str) -> None:
        """Make the channel's membership of group ``name`` match its local feeds."""
        member = self._members.get(name)
        if member is None:
            return
        async with member.lock:
            if member.count > 0 and not member.joined and not self._joins_failing:
                try:
                    await self.layer.group_add(name, await self._channel())
                except Exception as exc:
                    _subscribe_failures.warning("Could not join a stream's group", exc)
                    self._set_failing(joins=True)
                    self._rejoin_now.set()  # retried, with backoff
                else:
                    member.joined = True
            elif member.count <= 0 and member.joined:
                member.joined = False
                try:
                    assert self.channel is not None  # a group was joined: the channel is open
                    await self.layer.group_discard(name, self.channel)
                except Exception as exc:
                    # The layer drops the member after group_expiry; its messages are ignored.
                    _subscribe_failures.warning("Could not leave a stream's group", exc)
            if member.count <= 0 and not member.joined and self._members.get(name) is member:
                del self._members[name]
        if not self._members and not self._feeds:
            self._close()

    def _close(self) -> None:
        for task in self._background:
            _cancel_until_done(task)
        self._background = []
        self.channel = None
        with _hubs_lock:
            for key, hub in list(_hubs.items()):
                if hub is self:
                    del _hubs[key]

    async def _receive(self, channel: str) -> None:
        delay = RETRY_FIRST
        while not _cancel_requested():
            # The layer's receive runs as a task of its own, so that this one stops at
            # once when cancelled, even where the layer's client would let a
            # cancellation go by (see _cancel_until_done).
            receiving = asyncio.ensure_future(self.layer.receive(channel))
            # Retrieved even when this task stops first (a cancelled receive may still
            # end with the layer's error): never "exception was never retrieved".
            receiving.add_done_callback(_retrieve)
            try:
                if self._receive_failing:
                    await asyncio.wait({receiving}, timeout=RECEIVE_HEALTHY_AFTER)
                    if not receiving.done():
                        self._set_failing(receive=False)  # waiting, not failing: it is back
                await asyncio.wait({receiving})
            except asyncio.CancelledError:
                _cancel_until_done(receiving)
                raise
            finally:
                _retrieve_cleaners(self.layer)
            try:
                message = receiving.result()
            except Exception as exc:
                _receive_failures.warning("Could not receive stream messages", exc)
                self._set_failing(receive=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CEILING)
                self._rejoin_now.set()  # the layer may have lost the memberships too
                continue
            self._set_failing(receive=False)
            delay = RETRY_FIRST
            try:
                self._deliver(message)
            except Exception:
                logger.exception("Could not hand a stream message to its readers.")

    def _deliver(self, message: dict[str, Any]) -> None:
        # A message without a workflow or key (not one of ours) finds no feed.
        streams = self._feeds.get(message.get("workflow"))  # type: ignore[arg-type]
        if not streams:
            return
        kind = message.get("type")
        if kind in (ENDED, RESUMED):
            targets = [feed for feeds in streams.values() for feed in feeds]
        else:
            targets = list(streams.get(message.get("key"), ()))  # type: ignore[arg-type]  # see above
            values = message.get("values")
            if kind == ENTRIES and targets and isinstance(values, list):
                # This message is the hub's own copy: its frames are encoded once here.
                key, offset = message["key"], message["offset"]
                message["frames"] = [
                    entry_frame(key, offset + i, text) for i, text in enumerate(values)
                ]
        for feed in targets:
            feed.notify(message)

    async def _keep_joined(self) -> None:
        """Re-join every group now and then (the layer expires members), and after failures."""
        every = max(float(getattr(self.layer, "group_expiry", 86400) or 86400) / 4, 1.0)
        delay = RETRY_FIRST
        wait = every
        while not _cancel_requested():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._rejoin_now.wait()
            self._rejoin_now.clear()
            failed = False
            for name in list(self._members):
                member = self._members.get(name)
                if member is None or member.count <= 0:
                    continue
                async with member.lock:
                    if member.count <= 0 or self.channel is None:
                        continue
                    try:
                        await self.layer.group_add(name, self.channel)
                    except Exception as exc:
                        _subscribe_failures.warning("Could not join a stream's group", exc)
                        failed = True
                        break
                    member.joined = True
            self._set_failing(joins=failed)
            if failed:
                wait, delay = delay, min(delay * 2, RETRY_CEILING)
            else:
                wait, delay = every, RETRY_FIRST


def _cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _retrieve_cleaners(layer: object) -> None:
    """Retrieve the outcome of the tasks channels-redis starts after each receive.

    They tidy its backup queue in Redis, and fail while Redis is down; nobody else
    awaits them, so asyncio would log "exception was never retrieved".
    """
    for task in list(getattr(layer, "receive_cleaners", ())):
        task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _cancel_until_done(task: asyncio.Task[Any], every: float = 0.1) -> None:
    """Cancel ``task``, and again every ``every`` seconds until it has ended.

    On Python 3.11, ``asyncio.wait_for`` drops a cancellation that arrives as its
    inner operation completes, and the Redis client awaits its socket writes that way:
    cancelled once, a receive can carry on, retrying, for as long as its retries last.
    A loop that is closing would wait for it all that time.
    """
    if task.done():
        return
    task.cancel()
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to stop
        task.get_loop().call_later(every, _cancel_until_done, task, every)


_hubs: dict[tuple[asyncio.AbstractEventLoop, ChannelLayer], _Hub] = {}
_hubs_lock = threading.Lock()
_subscribe_failures = _Throttled()
_receive_failures = _Throttled()
_read_failures = _Throttled()


def _local_hub() -> _Hub | None:
    """The hub of the running loop and the default channel layer (None without a layer)."""
    layer = channel_layer()
    if layer is None:
        return None
    loop = asyncio.get_running_loop()
    with _hubs_lock:
        hub = _hubs.get((loop, layer))
        if hub is None:
            for key in [key for key in _hubs if key[0].is_closed()]:
                del _hubs[key]
            hub = _hubs[(loop, layer)] = _Hub(layer)
        return hub


# Shared by the WebSocket and Server-Sent Events endpoints

BAD_REQUEST = 4400
FORBIDDEN = 4403
NOT_FOUND = 4404
SERVER_ERROR = 1011
# A WebSocket client left its window full, unacknowledged, for READER_STALL_SECONDS.
TOO_SLOW = 4408

# Offsets live in a PositiveIntegerField: at most 2**31 - 1 on every database.
MAX_OFFSET = 2**31 - 1
_DIGITS = re.compile(r"[0-9]{1,10}")


class BadParameters(ValueError):
    """A stream address or offset that the endpoints refuse; the message says why."""


def parse_offset(raw: str | None, what: str = "offset") -> int:
    if raw is None:
        return 0
    if not _DIGITS.fullmatch(raw) or int(raw) > MAX_OFFSET:
        raise BadParameters(f"{what} must be a whole number from 0 to {MAX_OFFSET}, not {raw!r}.")
    return int(raw)


def parse_address(workflow_id: Any, key: Any) -> tuple[str, str]:
    if not isinstance(workflow_id, str) or not workflow_id or len(workflow_id) > 255:
        raise BadParameters("The workflow id must be 1 to 255 characters.")
    try:
        # A NUL reaching PostgreSQL would fail the query (DataError), not find nothing.
        encoding.check_text("The workflow id", workflow_id)
        encoding.check_key(key)
    except (TypeError, ValueError) as exc:
        raise BadParameters(str(exc)) from None
    return workflow_id, key


def entry_frame(key: str, offset: int, text: str) -> str:
    # ``text`` is stored JSON: it goes into the frame as is, never decoded.
    return f'{{"type":"entry","key":{json.dumps(key)},"offset":{offset},"value":{text}}}'


def frame_bytes(text: str) -> int:
    """The UTF-8 size of a frame; ASCII frames (the usual case) are not encoded to count."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# The reasons the endpoints give, the same over both.
NOT_FOUND_REASON = "No such workflow, or you may not read it."
REVOKED_REASON = "You may no longer read this stream."


def refused_frame(key: str) -> str:
    return json.dumps(
        {"type": "refused", "key": key, "reason": REVOKED_REASON}, separators=(",", ":")
    )


def closed_frame(key: str, length: int) -> str:
    return json.dumps({"type": "closed", "key": key, "length": length}, separators=(",", ":"))


def interrupted_frame(key: str, length: int, status: str) -> str:
    return json.dumps(
        {"type": "interrupted", "key": key, "length": length, "status": status},
        separators=(",", ":"),
    )
