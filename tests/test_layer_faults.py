"""While the channel layer fails, readers poll the database at POLL_INTERVAL; push resumes after.

The process-level test (a real Redis outage under a daphne process) is in
test_fault_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from durable_streams.bus import layer as ds_layer
from durable_streams.web import feed as ds_feed
from tests.layers import BreakableLayer
from tests.sockets import (
    READER_FIXTURES,
    record_reads,
    start,
)
from tests.waiting import wait_until_async
from tests.workflows_readers import gated

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]


async def test_readers_poll_at_the_normal_interval_while_the_layer_fails(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.DURABLE_STREAMS = {
        **settings.DURABLE_STREAMS,
        "POLL_INTERVAL": 0.05,
        "NOTIFY_FALLBACK_POLL": 1.0,
    }
    layer = BreakableLayer()
    monkeypatch.setattr(ds_layer, "channel_layer", lambda: layer)
    loop = asyncio.get_running_loop()
    reads = record_reads(monkeypatch, times=True)
    wid = await start(gated, "out", [], [], "gate-never")  # never run: the stream stays empty
    feed = ds_feed.StreamFeed(wid, "out", 0)
    assert feed.pushed
    events = feed.events()
    waiting = asyncio.ensure_future(events.__anext__())
    try:
        await wait_until_async(lambda: reads)
        # Nothing is to happen for a while (a deliberate wait): pushed, no poll before
        # the silence of 1 s.
        await asyncio.sleep(0.3)
        assert len(reads) == 1, reads
        layer.go_down()
        down_at = loop.time()

        def during() -> list[float]:
            return [t for t in reads if t >= down_at]

        await wait_until_async(lambda: len(during()) >= 8, what="eight polls")
        # At 0.05 s, not after 1, 2, 4 s of silence: eight polls take about 0.4 s, where
        # the backed-off ones would take more than a minute.
        assert during()[7] - down_at < 3.0, reads
        layer.come_back()
        back_at = loop.time()
        hub = ds_layer.local_hub()
        assert hub is not None
        await wait_until_async(lambda: not hub.failing, timeout=5)
        # Pushed again: a message arrives at once, and the polling stops.
        recovered = loop.time()
        assert recovered - back_at < 2.5
        await layer.messages.put(
            {
                "type": ds_layer.ENTRIES,
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
        # Nothing is to happen for a while (a deliberate wait): no polling at 0.05 s.
        await asyncio.sleep(0.8)
        assert len(reads) - polled <= 1, reads
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await waiting
        await events.aclose()
