"""The channel layer: committed stream changes carried to the live feeds of every process.

After the transaction that stored a change commits, ``bus.publish_streams`` and
``bus.publish_changes`` call the hooks below (``entries_committed``, ``stream_closed``,
``workflow_ended``, ``workflows_resumed``). They hand a small message to the channel
layer and return at once; they never raise into the workflow.

Each event loop that serves readers holds one subscription to the layer (``_Hub``):
one layer channel, in the groups of every stream that a local reader follows, and one
task that receives from it and hands each message to the local subscribers (``Subscriber``) of
that stream. A thousand sockets on one stream in one process are one group member,
so the layer stores and delivers each message once per process, not once per socket.

The layer drops messages when a channel is full (at-most-once), so it is only a
doorbell that happens to carry small values: subscribers number every value by
offset and read the database after a gap or a silence.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from ..db import alias

if TYPE_CHECKING:
    pass

logger = logging.getLogger("durable_streams.web.feed")

# Messages whose values add up to more characters than this go out without them:
# the subscribers read those values from the database.
INLINE_LIMIT = 16 * 1024
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


class EntriesMessage(TypedDict):
    """``count`` values were stored from ``offset`` on; ``values`` None when too big to travel."""

    type: str  # ENTRIES
    workflow: str
    key: str
    offset: int
    count: int
    values: list[str] | None


class ClosedMessage(TypedDict):
    type: str  # CLOSED
    workflow: str
    key: str
    length: int


class EndedMessage(TypedDict):
    """The workflow ended; ``lengths`` (by key) only after a success, and not for too many."""

    type: str  # ENDED
    workflow: str
    status: str | None
    lengths: dict[str, int] | None


class ResumedMessage(TypedDict):
    type: str  # RESUMED
    workflow: str


Message = EntriesMessage | ClosedMessage | EndedMessage | ResumedMessage


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


class Subscriber(Protocol):
    """A local reader of one stream that the hub hands the stream's messages to."""

    workflow_id: str
    key: str
    # The channel layer groups it needs: the stream's and its workflow's.
    groups: list[str]

    def notify(self, message: dict[str, Any]) -> None:
        """A message for the stream (on the loop the hub runs on)."""

    def wake(self) -> None:
        """The layer fails: read the database now instead of waiting for a message."""


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


class Throttled:
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


_send_failures = Throttled()


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


def publish(group: str, typed: Message) -> None:
    """Hand ``message`` to the channel layer's ``group`` without waiting; never raises."""
    # The layers take plain dicts; the subscribers add the encoded frames to it.
    message: dict[str, Any] = dict(typed)
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
        EntriesMessage(
            type=ENTRIES,
            workflow=workflow_id,
            key=key,
            offset=first_offset,
            count=len(values),
            values=inline,
        ),
    )


def stream_closed(workflow_id: str, key: str, length: int) -> None:
    """Stream ``key`` was closed with ``length`` values."""
    publish(
        stream_group(workflow_id, key),
        ClosedMessage(type=CLOSED, workflow=workflow_id, key=key, length=length),
    )


def workflows_resumed(workflow_ids: list[str]) -> None:
    """These workflows were sent back to the queue: their interrupted streams reopened."""
    for workflow_id in workflow_ids:
        publish(workflow_group(workflow_id), ResumedMessage(type=RESUMED, workflow=workflow_id))


def _final_lengths(workflow_id: str) -> dict[str, int] | None:
    # Imported here: the models need the app registry, and this module is imported by
    # the routing that an ASGI module may load before Django is set up.
    from ..models import Stream

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
        EndedMessage(type=ENDED, workflow=workflow_id, status=status, lengths=lengths),
    )


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

    The layer forgets a group member after its ``group_expiry`` (a day by default),
    so the hub re-joins its groups every quarter of that. When receiving or joining
    fails, it tries again with a bounded backoff; meanwhile the feeds re-read the
    database after a silence, as they do after any lost message.
    """

    def __init__(self, layer: ChannelLayer) -> None:
        self.layer = layer
        # Whether other processes' messages arrive here too (see feed's doorbells).
        self.crosses = crosses_processes(layer)
        self.channel: str | None = None
        self._feeds: dict[str, dict[str, set[Subscriber]]] = {}
        self._members: dict[str, _Membership] = {}
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

    async def subscribe(self, feed: Subscriber) -> None:
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

    async def unsubscribe(self, feed: Subscriber) -> None:
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
_subscribe_failures = Throttled()
_receive_failures = Throttled()


def local_hub() -> _Hub | None:
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
