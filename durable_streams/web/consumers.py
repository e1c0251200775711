"""The WebSocket endpoint of one stream.

Protocol (JSON text frames, server to client)::

    {"type": "entry", "key": K, "offset": N, "value": V}   each value, in offset order
    {"type": "closed", "key": K, "length": L}             once the stream has ended

then the server closes the socket with code 1000. After ``READER_HEARTBEAT_SECONDS``
without any frame (a quiet stream, a full window, an interruption) the server sends::

    {"type": "heartbeat", "interval": S}                  S: READER_HEARTBEAT_SECONDS

so that a client can tell a quiet stream from a lost connection; clients ignore
frame types they do not know. ``closed`` is final: the stream
never grows again. A stream that was still open when its workflow failed or was
cancelled is not closed but interrupted; once its L values are sent::

    {"type": "interrupted", "key": K, "length": L, "status": "CANCELLED" | "ERROR"}

and the socket stays open: if the workflow is resumed, the values of the resumed
run follow (from offset L), then ``closed``. The client asks for the first offset
it still needs with ``?offset=N`` (default 0).

Flow control (client to server, JSON text frames)::

    {"type": "ack", "offset": N}   N: the next offset the client needs

The server sends at most ``READER_WINDOW_BYTES`` of entry frames beyond the last
acknowledged offset (at least one frame, however large). With the window full it
stops reading the stream until an ack frees room; a client that sends no ack for
``READER_STALL_SECONDS`` meanwhile (a client that does not know acks, or does not
read) is closed with 4408, and reconnects from its offset. Acks are cumulative;
one that acknowledges nothing new still counts as a sign of life. Other client
frames, and malformed acks, are ignored.

Refusals close the socket
right after accepting it (a close before the handshake would reach a browser as
a bare HTTP 403), with a code and a short reason; some servers, daphne among them,
drop the reason, so clients go by the code:

    4400  bad parameters (offset not a whole number or given twice, bad key or id)
    4404  no such workflow, or the user may not read this stream (``AUTHORIZE_READER``):
          the same answer for both, so that nobody can probe which ids exist
    4403  the user could read the stream when it connected, but may no longer: access
          is checked again every ``REAUTHORIZE_SECONDS`` while the socket is open
    4408  too slow: the window stayed full without an ack (reconnect from your offset)
    1011  an error on the server (logged there, never sent to the client)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from .. import telemetry
from ..auth import ReaderAccess, may_read
from ..conf import get_config
from .feed import Entry, Interrupted, Revoked, StreamFeed, run_db
from .protocol import (
    BAD_REQUEST,
    FORBIDDEN,
    NOT_FOUND,
    NOT_FOUND_REASON,
    REVOKED_REASON,
    SERVER_ERROR,
    TOO_SLOW,
    BadParameters,
    closed_frame,
    entry_frame,
    frame_bytes,
    heartbeat_frame,
    interrupted_frame,
    parse_address,
    parse_offset,
)

logger = logging.getLogger("durable_streams.consumers")

# Client frames longer than this are not acks: ignored without being parsed.
MAX_ACK_CHARS = 256


def _reason(text: str) -> str:
    # A close reason is at most 123 bytes of UTF-8.
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


def ack_offset(text: str | None) -> int | None:
    """The offset of an ``{"type": "ack", "offset": N}`` frame; None for any other frame."""
    if text is None or len(text) > MAX_ACK_CHARS:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "ack":
        return None
    offset = message.get("offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        return None
    return offset


def _session_key(scope: dict[str, Any]) -> str | None:
    # Channels' SessionMiddleware puts a lazy session store here; AuthMiddleware read
    # the user from it (a session that was not found has no key any more).
    session = scope.get("session")
    return getattr(session, "session_key", None) if session is not None else None


class StreamConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # channels: no types
    """Sends one stream from the requested offset, live, until it is closed.

    The socket has no channel of its own on the channel layer and joins no group:
    its feed is subscribed through this process's one subscription per stream (see
    delivery.py), which hands each message to every local socket of the stream.
    """

    # Channels looks the consumer's layer up by this alias; no CHANNEL_LAYERS entry is
    # named None, so the socket gets no layer and no per-socket channel to receive
    # from (and a failing layer cannot end it).
    channel_layer_alias = None

    feed: StreamFeed | None = None
    _pump: asyncio.Task[None] | None = None
    _beat: asyncio.Task[None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Entry frames sent and not yet acknowledged, oldest first: (offset, bytes).
        self._unacked: collections.deque[tuple[int, int]] = collections.deque()
        self._unacked_bytes = 0
        self._acked = asyncio.Event()
        # Set by every frame sent: the heartbeat waits for a silence, not a clock tick.
        # The loop time of the last frame sent; the heartbeat sleeps until a silence is due.
        self._sent_at = 0.0

    async def connect(self) -> None:
        try:
            kwargs = self.scope.get("url_route", {}).get("kwargs", {})
            query = parse_qs(
                self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
            )
            offsets = query.get("offset", [])
            if len(offsets) > 1:
                raise BadParameters("Give offset once.")
            workflow_id, key = parse_address(kwargs.get("workflow_id"), kwargs.get("key"))
            offset = parse_offset(offsets[0] if offsets else None)
        except BadParameters as exc:
            await self._refuse(BAD_REQUEST, str(exc))
            return
        user = self.scope.get("user")
        try:
            allowed = await run_db(may_read, user, workflow_id, key)
        except Exception:
            logger.exception("Could not authorize a reader of stream %r of %r.", key, workflow_id)
            await self._refuse(SERVER_ERROR, "Server error.")
            return
        if not allowed:
            await self._refuse(NOT_FOUND, NOT_FOUND_REASON)
            return
        await self.accept()
        access = ReaderAccess(user, _session_key(self.scope), workflow_id, key)
        self.feed = StreamFeed(workflow_id, key, offset, access)
        self._pump = asyncio.create_task(self._send_feed(self.feed))
        self._beat = asyncio.create_task(self._heartbeat(get_config().READER_HEARTBEAT_SECONDS))
        telemetry.reader_connected("websocket")

    async def _refuse(self, code: int, reason: str) -> None:
        # Accept first: a close before the handshake reaches the browser as a bare 403.
        await self.accept()
        await self.close(code=code, reason=_reason(reason))

    async def _send_feed(self, feed: StreamFeed) -> None:
        config = get_config()
        window, stall = config.READER_WINDOW_BYTES, config.READER_STALL_SECONDS
        try:
            async with contextlib.aclosing(feed.events()) as events:
                async for event in events:
                    if isinstance(event, Entry):
                        frame = event.frame or entry_frame(feed.key, event.offset, event.text)
                        await self.send(text_data=frame)
                        size = frame_bytes(frame)
                        self._unacked.append((event.offset, size))
                        self._unacked_bytes += size
                        # Not pulling from the feed is the pause: it reads nothing meanwhile.
                        if self._unacked_bytes >= window and not await self._room(window, stall):
                            await self.close(
                                code=TOO_SLOW, reason="Too slow: reconnect from your offset."
                            )
                            return
                    elif isinstance(event, Revoked):
                        await self.close(code=FORBIDDEN, reason=_reason(REVOKED_REASON))
                        return
                    elif isinstance(event, Interrupted):
                        # Not an end: the socket stays open and follows a resume.
                        frame = interrupted_frame(feed.key, event.length, event.status)
                        await self.send(text_data=frame)
                    else:
                        await self.send(text_data=closed_frame(feed.key, event.length))
                        await self.close(code=1000)
                        return
        except Exception:
            logger.exception("Stream %r of workflow %r failed.", feed.key, feed.workflow_id)
            with contextlib.suppress(Exception):
                await self.close(code=SERVER_ERROR, reason="Server error.")

    async def send(self, text_data: str | None = None, **kwargs: Any) -> None:
        # A float stored per frame, no wake-up: the heartbeat looks at it when it is due.
        self._sent_at = asyncio.get_running_loop().time()
        await super().send(text_data=text_data, **kwargs)

    async def _heartbeat(self, interval: float) -> None:
        """Send a heartbeat frame after each ``interval`` seconds without any frame."""
        frame = heartbeat_frame(interval)
        loop = asyncio.get_running_loop()
        self._sent_at = loop.time()
        with contextlib.suppress(Exception):
            while True:
                due = self._sent_at + interval - loop.time()
                if due > 0:
                    await asyncio.sleep(due)
                    continue
                if self._pump is not None and self._pump.done():
                    return  # the socket is closing
                await self.send(text_data=frame)

    async def _room(self, window: int, stall: float) -> bool:
        """Wait until acks bring the unacknowledged data under ``window``.

        False once ``stall`` seconds pass without any ack.
        """
        while self._unacked_bytes >= window:
            self._acked.clear()
            try:
                async with asyncio.timeout(stall):
                    await self._acked.wait()
            except TimeoutError:
                return False
        return True

    async def disconnect(self, code: int) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._beat
        if self._pump is not None:
            telemetry.reader_disconnected("websocket")
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Acks free the window; anything else a client sends is ignored."""
        offset = ack_offset(text_data)
        if offset is None:
            return
        while self._unacked and self._unacked[0][0] < offset:
            self._unacked_bytes -= self._unacked.popleft()[1]
        self._acked.set()


class BadAddressConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # see above
    """Answers a path under the stream prefix that is no stream's address: 4400.

    Without it the router finds no route and raises, and the server logs a traceback
    and fails the handshake.
    """

    channel_layer_alias = None

    async def connect(self) -> None:
        await self.accept()
        await self.close(
            code=BAD_REQUEST,
            reason="Not a stream address: use ws/durable-streams/<workflow_id>/<key>/.",
        )
