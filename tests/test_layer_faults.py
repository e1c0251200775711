"""While the channel layer fails, readers poll the database at POLL_INTERVAL; push resumes after.

The process-level test (a real Redis outage under a daphne process) is in
test_fault_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import pytest

from durable_streams import delivery
from tests.test_consumers import (  # the fixtures apply here too
    _channel_layer_per_test,  # noqa: F401
    _close_thread_connections,  # noqa: F401
    gated,
    start,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)


class _BreakableLayer:
    """A channel layer that can go down (every call fails) and come back."""

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

    async def new_channel(self) -> str:
        return "hub-breakable!1"

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


async def test_readers_poll_at_the_normal_interval_while_the_layer_fails(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.DURABLE_STREAMS = {
        **settings.DURABLE_STREAMS,
        "POLL_INTERVAL": 0.05,
        "NOTIFY_FALLBACK_POLL": 1.0,
    }
    layer = _BreakableLayer()
    monkeypatch.setattr(delivery, "channel_layer", lambda: layer)
    loop = asyncio.get_running_loop()
    reads: list[float] = []
    read_batch = delivery.read_batch

    def counted(workflow_id: str, key: str, offset: int) -> delivery.Batch:
        reads.append(loop.time())
        return read_batch(workflow_id, key, offset)

    monkeypatch.setattr(delivery, "read_batch", counted)
    wid = await start(gated, "out", [], [], "gate-never")  # never run: the stream stays empty
    feed = delivery.StreamFeed(wid, "out", 0)
    assert feed.pushed
    events = feed.events()
    waiting = asyncio.ensure_future(events.__anext__())
    try:
        await wait_for(lambda: reads)
        await asyncio.sleep(0.3)
        assert len(reads) == 1, reads  # pushed: no poll before the silence of 1 s
        layer.go_down()
        down_at = loop.time()
        await asyncio.sleep(1.0)
        during = [t for t in reads if t >= down_at]
        # At 0.05 s, not after 1, 2, 4 s of silence: about 20 reads in that second.
        assert len(during) >= 8, reads
        layer.come_back()
        back_at = loop.time()
        hub = delivery._local_hub()
        assert hub is not None
        await wait_for(lambda: not hub.failing, timeout=5)
        # Pushed again: a message arrives at once, and the polling stops.
        recovered = loop.time()
        assert recovered - back_at < 2.5
        await layer.messages.put(
            {
                "type": delivery.ENTRIES,
                "workflow": wid,
                "key": "out",
                "offset": 0,
                "count": 1,
                "values": ['"pushed"'],
            }
        )
        entry = await asyncio.wait_for(waiting, 1.0)
        assert (entry.offset, entry.text) == (0, '"pushed"')
        assert loop.time() - recovered < 1.0
        polled = len(reads)
        waiting = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.8)
        assert len(reads) - polled <= 1, reads
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await waiting
        await events.aclose()


class _FailsAfterCancelLayer:
    """A receive that lets its first cancellation go by, then fails with the layer's error."""

    def __init__(self) -> None:
        self.receive_ended = asyncio.Event()

    async def new_channel(self) -> str:
        return "hub-fails-after-cancel!1"

    async def group_add(self, group: str, channel: str) -> None:
        pass

    async def group_discard(self, group: str, channel: str) -> None:
        pass

    async def receive(self, channel: str) -> dict[str, Any]:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        try:
            raise ConnectionError("Connection closed by server.")
        finally:
            self.receive_ended.set()


class _Feed:
    def __init__(self, workflow_id: str, key: str) -> None:
        self.workflow_id, self.key = workflow_id, key
        self.groups = [
            delivery.stream_group(workflow_id, key),
            delivery.workflow_group(workflow_id),
        ]


async def test_a_receive_that_fails_after_the_hub_closed_is_retrieved() -> None:
    loop = asyncio.get_running_loop()
    unheard: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: unheard.append(context))
    try:
        layer = _FailsAfterCancelLayer()
        hub = delivery._Hub(layer)
        feed = _Feed("wf-fails-after-cancel", "out")
        await hub.subscribe(feed)  # type: ignore[arg-type]
        background = list(hub._background)
        await hub.unsubscribe(feed)  # the stream ended: the hub closes
        await asyncio.wait_for(layer.receive_ended.wait(), 2)
        await asyncio.wait_for(asyncio.wait(background), 2)
        await asyncio.sleep(0.3)  # past _cancel_until_done's last look at it
        del background, hub
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not [c for c in unheard if "never retrieved" in c.get("message", "")], unheard
