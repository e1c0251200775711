"""WebSocket clients of items 3 and 4, in a process of their own.

``latency URL --go PATH``: one client; the latency of every value from its write time.
``fanout URL --clients N --go PATH``: N clients on one stream; says ready once all have
the first value, creates ``PATH``, then counts what each one receives until the close.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import websockets

from bench.common import emit_ready, emit_result, percentile

ORIGIN = "http://127.0.0.1"


async def one_client(
    url: str,
    latencies: list[float],
    counts: list[int],
    index: int,
    hello: asyncio.Event | None,
    limit: float,
) -> str:
    """Receive one stream to its close; return how it ended."""
    # No keepalive pings: browsers send none, and a busy server must not fail them.
    async with websockets.connect(
        url, origin=ORIGIN, max_queue=None, open_timeout=120, ping_interval=None
    ) as ws:
        # One deadline for the whole stream: asyncio.wait_for around each recv() made
        # a task per frame, a fifth of this process's CPU with a thousand clients.
        try:
            async with asyncio.timeout(limit):
                while True:
                    raw = await ws.recv()
                    now = time.time()
                    frame: dict[str, Any] = json.loads(raw)
                    if frame["type"] == "closed":
                        return "closed"
                    value = frame["value"]
                    if value["i"] < 0:
                        if hello is not None:
                            hello.set()
                        continue
                    counts[index] += 1
                    latencies.append((now - value["t"]) * 1000.0)
        except TimeoutError:
            return "timeout"


async def latency(args: argparse.Namespace) -> None:
    latencies: list[float] = []
    counts = [0]
    hello = asyncio.Event()
    emit_ready()
    task = asyncio.create_task(one_client(args.url, latencies, counts, 0, hello, args.limit))
    await asyncio.wait_for(hello.wait(), 60)
    await asyncio.to_thread(Path(args.go).touch)
    ended = await task
    emit_result({"latencies_ms": latencies, "ended": ended})


async def fanout(args: argparse.Namespace) -> None:
    latencies: list[float] = []
    counts = [0] * args.clients
    hellos = [asyncio.Event() for _ in range(args.clients)]
    tasks = []
    for i in range(args.clients):
        tasks.append(
            asyncio.create_task(one_client(args.url, latencies, counts, i, hellos[i], args.limit))
        )
        if i % 10 == 9:
            await asyncio.sleep(10 / args.ramp)  # clients arrive at ``ramp`` per second
    connect_started = time.monotonic()
    # Go once every client has the first value or has failed, within a bounded time.
    deadline = connect_started + 60
    while time.monotonic() < deadline:
        waiting = [i for i in range(args.clients) if not hellos[i].is_set() and not tasks[i].done()]
        if not waiting:
            break
        await asyncio.sleep(0.1)
    connected = time.monotonic() - connect_started
    emit_ready(f"{connected:.3f}")
    cpu_started, wall_started = time.process_time(), time.monotonic()
    await asyncio.to_thread(Path(args.go).touch)
    ended = await asyncio.gather(*tasks, return_exceptions=True)
    # Whether this process kept up: near 100% of one core, it was the bottleneck.
    client_cpu = time.process_time() - cpu_started
    client_wall = max(time.monotonic() - wall_started, 1e-9)
    emit_result(
        {
            "clients": args.clients,
            "counts": counts,
            "connected": sum(1 for h in hellos if h.is_set()),
            "closed": sum(1 for e in ended if e == "closed"),
            "errors": [repr(e) for e in ended if isinstance(e, BaseException)][:5],
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "connect_s": connected,
            "client_cpu_pct": 100.0 * client_cpu / client_wall,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_client")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("latency")
    p.add_argument("url")
    p.add_argument("--go", required=True)
    p.add_argument("--limit", type=float, default=120)
    p.set_defaults(func=latency)
    p = sub.add_parser("fanout")
    p.add_argument("url")
    p.add_argument("--go", required=True)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--ramp", type=float, default=100, help="new clients per second")
    p.add_argument("--limit", type=float, default=240)
    p.set_defaults(func=fanout)
    args = parser.parse_args()
    asyncio.run(args.func(args))


if __name__ == "__main__":
    main()
