"""The WebSocket endpoint of one stream.

Protocol (JSON text frames, server to client)::

    {"type": "entry", "key": K, "offset": N, "value": V}   each value, in offset order
    {"type": "closed", "key": K, "length": L}             once the stream has ended

then the server closes the socket with code 1000. The client asks for the first
offset it still needs with ``?offset=N`` (default 0). Refusals close the socket
right after accepting it (a close before the handshake would reach a browser as
a bare HTTP 403), with a code and a short reason; some servers, daphne among them,
drop the reason, so clients go by the code:

    4400  bad parameters (offset not a whole number, bad key)
    4404  no such workflow, or the user may not read this stream (``AUTHORIZE_READER``):
          the same answer for both, so that nobody can probe which ids exist
    4403  the user could read the stream when it connected, but may no longer: access
          is checked again every ``REAUTHORIZE_SECONDS`` while the socket is open
    1011  an error on the server (logged there, never sent to the client)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from . import delivery
from .auth import ReaderAccess
from .delivery import (
    BAD_REQUEST,
    FORBIDDEN,
    NOT_FOUND,
    NOT_FOUND_REASON,
    REVOKED_REASON,
    SERVER_ERROR,
    BadParameters,
    closed_frame,
    entry_frame,
    may_read,
    parse_address,
    parse_offset,
)

logger = logging.getLogger("durable_streams.consumers")


def _reason(text: str) -> str:
    # A close reason is at most 123 bytes of UTF-8.
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


def _session_key(scope: dict[str, Any]) -> str | None:
    # Channels' SessionMiddleware puts a lazy session store here; AuthMiddleware read
    # the user from it (a session that was not found has no key any more).
    session = scope.get("session")
    return getattr(session, "session_key", None) if session is not None else None


class StreamConsumer(AsyncWebsocketConsumer):
    """Sends one stream from the requested offset, live, until it is closed.

    The socket has no channel of its own on the channel layer and joins no group:
    its feed is subscribed through this process's one subscription per stream (see
    delivery.py), which hands each message to every local socket of the stream.
    """

    # Channels looks the consumer's layer up by this alias; no CHANNEL_LAYERS entry is
    # named None, so the socket gets no layer and no per-socket channel to receive
    # from (and a failing layer cannot end it).
    channel_layer_alias = None  # type: ignore[assignment]

    feed: delivery.StreamFeed | None = None
    _pump: Any = None

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
            refusal = await delivery.run_db(may_read, user, workflow_id, key)
        except Exception:
            logger.exception("Could not authorize a reader of stream %r of %r.", key, workflow_id)
            await self._refuse(SERVER_ERROR, "Server error.")
            return
        if refusal is not None:
            await self._refuse(NOT_FOUND, NOT_FOUND_REASON)
            return
        await self.accept()
        access = ReaderAccess(user, _session_key(self.scope), workflow_id, key)
        self.feed = delivery.StreamFeed(workflow_id, key, offset, access)
        self._pump = asyncio.create_task(self._send_feed(self.feed))

    async def _refuse(self, code: int, reason: str) -> None:
        # Accept first: a close before the handshake reaches the browser as a bare 403.
        await self.accept()
        await self.close(code=code, reason=_reason(reason))

    async def _send_feed(self, feed: delivery.StreamFeed) -> None:
        try:
            async with contextlib.aclosing(feed.events()) as events:
                async for event in events:
                    if isinstance(event, delivery.Entry):
                        frame = event.frame or entry_frame(feed.key, event.offset, event.text)
                        await self.send(text_data=frame)
                    elif isinstance(event, delivery.Revoked):
                        await self.close(code=FORBIDDEN, reason=_reason(REVOKED_REASON))
                        return
                    else:
                        await self.send(text_data=closed_frame(feed.key, event.length))
                        await self.close(code=1000)
                        return
        except Exception:
            logger.exception("Stream %r of workflow %r failed.", feed.key, feed.workflow_id)
            with contextlib.suppress(Exception):
                await self.close(code=SERVER_ERROR, reason="Server error.")

    async def disconnect(self, code: int) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Clients have nothing to say; what they send is ignored."""
