"""A client process of the fault tests: starts workflows, or follows their streams and ends.

``python -m tests.fault_client start LABEL COUNT VALUES DELAY`` prints the ids of COUNT
``streaming`` workflows, one a line. ``python -m tests.fault_client follow ID...``
prints one JSON line per stream value (``["value", id, value]``) and per result
(``["result", id, output]``) as they come: half the streams are read with
read_stream() in threads, half with aread_stream(), and a result() waits for each.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

import django

_print_lock = threading.Lock()


def emit(*fields: Any) -> None:
    with _print_lock:
        print(json.dumps(fields), flush=True)


def start(label: str, count: int, values: int, delay: float) -> None:
    from tests.workflows_faults import streaming

    for i in range(count):
        print(streaming.start(f"{label}-{i}", values, delay).workflow_id, flush=True)


def follow(ids: list[str]) -> None:
    from django.db import connections

    from durable_streams import aread_stream, get_workflow, read_stream

    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            emit("error", args[0], f"{type(exc).__name__}: {exc}")
        finally:
            connections.close_all()

    def read(workflow_id: str) -> None:
        for value in read_stream(workflow_id, "out"):
            emit("value", workflow_id, value)

    def wait(workflow_id: str) -> None:
        emit("result", workflow_id, get_workflow(workflow_id).result())

    async def aread(workflow_id: str) -> None:
        try:
            async for value in aread_stream(workflow_id, "out"):
                emit("value", workflow_id, value)
        except Exception as exc:
            emit("error", workflow_id, f"{type(exc).__name__}: {exc}")

    async def aread_all(chosen: list[str]) -> None:
        await asyncio.gather(*(aread(workflow_id) for workflow_id in chosen))

    threads = [threading.Thread(target=guarded, args=(read, wid)) for wid in ids[::2]]
    threads += [threading.Thread(target=guarded, args=(wait, wid)) for wid in ids]
    for thread in threads:
        thread.start()
    asyncio.run(aread_all(ids[1::2]))
    for thread in threads:
        thread.join()
    emit("done")


if __name__ == "__main__":
    django.setup()
    command, *arguments = sys.argv[1:]
    if command == "start":
        start(arguments[0], int(arguments[1]), int(arguments[2]), float(arguments[3]))
    else:
        follow(arguments)
