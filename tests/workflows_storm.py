"""The workflow of the kill storm (tests/test_kill_storm.py), imported by tests/workflows.py.

Every step execution appends lines to a journal, a file opened with ``O_APPEND`` by whichever
worker process runs it, so the test can see every execution, including those of workers
killed before their checkpoint was recorded.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from durable_streams import close_stream, step, workflow, write_stream
from durable_streams.models import Status, Workflow
from durable_streams.runtime.execution import Execution, current_execution

from .models import Effect

STREAM = "out"
STREAM_STEP = "tests.storm.stream_step"
ATOMIC_STEP = "tests.storm.atomic_step"


def journal(path: str, **fields: Any) -> None:
    """Append one JSON line with a single ``write``: a kill cannot leave half of it."""
    line = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
    finally:
        os.close(fd)
    if written != len(line):
        raise OSError(f"short write to the journal {path}: {written} of {len(line)} bytes")


def _running() -> Execution:
    execution = current_execution()
    if execution is None:
        raise RuntimeError("the storm's steps run in a workflow")
    return execution


def _begin(path: str, kind: str, k: int) -> tuple[Execution, str]:
    """Journal the start of one execution of step ``k``; return its unique token.

    The clock is read before the lease is checked, so ``held`` is true only if this
    worker still held the workflow at or after ``t`` (the test's check relies on it).
    """
    execution = _running()
    token = uuid.uuid4().hex
    # CLOCK_MONOTONIC: one clock for every process of the machine, never set back.
    started = time.monotonic_ns()
    held = (
        Workflow.objects.using(execution.using)
        .filter(pk=execution.workflow_id, status=Status.RUNNING, lease_owner=execution.worker_id)
        .exists()
    )
    _journal_event(path, "start", execution, kind, k, token, held=held, t=started)
    return execution, token


def _end(path: str, execution: Execution, kind: str, k: int, token: str) -> None:
    _journal_event(path, "end", execution, kind, k, token, t=time.monotonic_ns())


def _journal_event(
    path: str, event: str, execution: Execution, kind: str, k: int, token: str, **more: Any
) -> None:
    journal(
        path,
        event=event,
        kind=kind,
        wid=execution.workflow_id,
        k=k,
        token=token,
        worker=execution.worker_id,
        **more,
    )


@step(name=STREAM_STEP)
def stream_step(path: str, k: int, values: int, pause: float) -> dict[str, Any]:
    """Writes ``values`` stream values while it runs (at least once), then returns its token."""
    execution, token = _begin(path, "stream", k)
    for j in range(values):
        write_stream(STREAM, ["step", k, token, j])
        time.sleep(pause / values)
    _end(path, execution, "stream", k, token)
    return {"k": k, "token": token}


@step(name=ATOMIC_STEP, atomic=True)
def atomic_step(path: str, k: int, pause: float) -> dict[str, Any]:
    """One database row and one stream value, committed with the checkpoint (exactly once)."""
    execution, token = _begin(path, "atomic", k)
    Effect.objects.using(execution.using).create(
        workflow_id=execution.workflow_id, label=f"storm-atomic-{k}", worker=token
    )
    # Before the stream write: on PostgreSQL the workflow's row is locked only from there.
    time.sleep(pause)
    write_stream(STREAM, ["atomic", k, token])
    _end(path, execution, "atomic", k, token)
    return {"k": k, "token": token}


@workflow(name="tests.storm", max_attempts=50)
def storm(
    path: str, steps: int, values: int, pause: float, atomic_every: int, atomic_pause: float
) -> list[str]:
    """``["body", 0, None]``, then per step k: the step's values, the atomic step's value
    (every ``atomic_every`` steps) and ``["body", k + 1, token of step k]``; then a close."""
    write_stream(STREAM, ["body", 0, None])
    tokens = []
    for k in range(steps):
        token = stream_step(path, k, values, pause)["token"]
        if has_atomic(k, atomic_every):
            atomic_step(path, k, atomic_pause)
        write_stream(STREAM, ["body", k + 1, token])
        tokens.append(token)
    close_stream(STREAM)
    return tokens


def has_atomic(k: int, atomic_every: int) -> bool:
    return atomic_every > 0 and k % atomic_every == atomic_every - 1
