"""Channel layer probes and stand-ins for the tests of the per-process hub."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from channels.layers import InMemoryChannelLayer

from durable_streams.bus import layer as ds_layer
from tests.waiting import wait_until_async


async def members(group: str) -> set[str]:
    """The channels in ``group``, as the default channel layer holds them."""
    layer = ds_layer.channel_layer()
    if isinstance(layer, InMemoryChannelLayer):
        return set(layer.groups.get(group, {}))
    # channels-redis: a sorted set of channel names per group.
    connection = layer.connection(layer.consistent_hash(group))
    return {name.decode() for name in await connection.zrange(layer._group_key(group), 0, -1)}


async def wait_members(group: str, count: int, timeout: float = 10.0) -> set[str]:
    """The channels in ``group`` once there are ``count`` of them."""
    found: set[str] = set()

    async def counted() -> bool:
        nonlocal found
        found = await members(group)
        return len(found) == count

    await wait_until_async(
        counted, timeout=timeout, interval=0.01, what=f"{count} member(s) of {group}"
    )
    return found


class FeedStub:
    """What the hub needs of a feed: its stream and its groups."""

    def __init__(self, workflow_id: str, key: str) -> None:
        self.workflow_id, self.key = workflow_id, key
        self.groups = [
            ds_layer.stream_group(workflow_id, key),
            ds_layer.workflow_group(workflow_id),
        ]


class StubLayer:
    """A channel layer of one channel, whose groups cost nothing; subclasses receive."""

    channel = "hub-stub!1"

    async def new_channel(self) -> str:
        return self.channel

    async def group_add(self, group: str, channel: str) -> None:
        pass

    async def group_discard(self, group: str, channel: str) -> None:
        pass


class BreakableLayer(StubLayer):
    """A channel layer that can go down (every call fails) and come back."""

    channel = "hub-breakable!1"

    def __init__(self) -> None:
        self.down = False
        self._broke = asyncio.Event()
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def go_down(self) -> None:
        self.down = True
        self._broke.set()

    def come_back(self) -> None:
        self.down = False
        self._broke = asyncio.Event()

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    async def group_add(self, group: str, channel: str) -> None:
        self._check()

    async def group_discard(self, group: str, channel: str) -> None:
        self._check()

    async def receive(self, channel: str) -> dict[str, Any]:
        await asyncio.sleep(0.001)
        self._check()
        getting = asyncio.ensure_future(self.messages.get())
        breaking = asyncio.ensure_future(self._broke.wait())
        try:
            await asyncio.wait({getting, breaking}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            breaking.cancel()
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()
        self._check()
        raise ConnectionError("Connection closed by server.")


class CarryOnLayer(StubLayer):
    """A channel layer whose receive lets its first cancellation go by and carries on.

    The Redis client can do this on Python 3.11 (``asyncio.wait_for`` drops a
    cancellation that arrives as its operation completes).
    """

    channel = "hub-test!1"

    def __init__(self) -> None:
        self.cancellations = 0
        self.receive_ended = asyncio.Event()

    async def receive(self, channel: str) -> dict[str, Any]:
        try:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    self.cancellations += 1
                    if self.cancellations > 1:
                        raise
        finally:
            self.receive_ended.set()


class FailsAfterCancelLayer(StubLayer):
    """A receive that lets its first cancellation go by, then fails with the layer's error."""

    channel = "hub-fails-after-cancel!1"

    def __init__(self) -> None:
        self.receive_ended = asyncio.Event()

    async def receive(self, channel: str) -> dict[str, Any]:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        try:
            raise ConnectionError("Connection closed by server.")
        finally:
            self.receive_ended.set()
