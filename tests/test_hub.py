"""The per-process hub's own life: its receive ends when its last feed leaves or it is
cancelled, even where the layer's client lets a cancellation go by.

Stand-in layers (``tests.layers``) play the client's misbehaviour; no database, no socket.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from durable_streams.bus import layer as ds_layer
from tests.layers import CarryOnLayer, FailsAfterCancelLayer, FeedStub


async def test_the_last_feed_leaving_ends_the_receive_even_if_a_cancellation_is_lost() -> None:
    layer = CarryOnLayer()
    hub = ds_layer._Hub(layer)
    feed = FeedStub("wf-carry-on", "out")
    await hub.subscribe(feed)  # type: ignore[arg-type]
    background = list(hub._background)
    assert len(background) == 2 and not any(task.done() for task in background)
    await hub.unsubscribe(feed)  # type: ignore[arg-type]
    await asyncio.wait_for(layer.receive_ended.wait(), 2)
    await asyncio.wait_for(asyncio.wait(background), 2)
    assert layer.cancellations == 2
    assert all(task.cancelled() for task in background)


async def test_a_cancelled_hub_stops_at_once_even_if_the_layer_carries_on() -> None:
    # What a closing event loop does: cancel every task once.
    layer = CarryOnLayer()
    hub = ds_layer._Hub(layer)
    feed = FeedStub("wf-carry-on-2", "out")
    await hub.subscribe(feed)  # type: ignore[arg-type]
    receiving, keeping = hub._background
    for task in (receiving, keeping):
        task.cancel()
    await asyncio.wait_for(asyncio.wait({receiving, keeping}), 1)
    await asyncio.wait_for(layer.receive_ended.wait(), 2)
    assert receiving.cancelled() and keeping.cancelled()
    assert layer.cancellations == 2


async def test_a_receive_that_fails_after_the_hub_closed_is_retrieved() -> None:
    loop = asyncio.get_running_loop()
    unheard: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: unheard.append(context))
    try:
        layer = FailsAfterCancelLayer()
        hub = ds_layer._Hub(layer)
        feed = FeedStub("wf-fails-after-cancel", "out")
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
