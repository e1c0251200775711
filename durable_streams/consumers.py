"""The WebSocket endpoint of one stream.

Protocol (JSON text frames, server to client)::

    {"type": "entry", "key": K, "offset": N, "value": V}   each value, in offset order
    {"type": "closed", "key": K, "length": L}             once the stream has ended

then the server closes the socket with code 1000. The client asks for the first
offset it still needs with ``?offset=N`` (default 0). Refusals close the socket
right after accepting it (a close before the handshake would reach a browser as
a bare HTTP 403), with a code and a short reason; some servers, daphne among them,
drop the reason, so clients go by the code:

    4400  bad parameters (offset not a whole number or given twice, bad key or id)
    4403  the user may not read this stream (``AUTHORIZE_READER``)
    4404  no such workflow
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
from .delivery import (
    BAD_REQUEST,
    FORBIDDEN,
    NOT_FOUND,
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
        try:
            refusal = await delivery.run_db(may_read, self.scope.get("user"), workflow_id, key)
        except Exception:
            logger.exception("Could not authorize a reader of stream %r of %r.", key, workflow_id)
            await self._refuse(SERVER_ERROR, "Server error.")
            return
        if refusal == NOT_FOUND:
            await self._refuse(NOT_FOUND, "No such workflow.")
            return
        if refusal == FORBIDDEN:
            await self._refuse(FORBIDDEN, "You may not read this stream.")
            return
        await self.accept()
        self.feed = delivery.StreamFeed(workflow_id, key, offset)
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


class BadAddressConsumer(AsyncWebsocketConsumer):
    """Answers a path under the stream prefix that is no stream's address: 4400.

    Without it the router finds no route and raises, and the server logs a traceback
    and fails the handshake.
    """

    channel_layer_alias = None  # type: ignore[assignment]

    async def connect(self) -> None:
        await self.accept()
        await self.close(
            code=BAD_REQUEST,
            reason="Not a stream address: use ws/durable-streams/<workflow_id>/<key>/.",
        )
