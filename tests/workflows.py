"""Workflows used by the tests; found by the autodiscovery of ``workflows`` modules."""

from __future__ import annotations

import time
from typing import Any

from durable_streams import (
    StreamClosed,
    close_stream,
    current_workflow_id,
    step,
    workflow,
    write_stream,
)

from .models import Effect


def effect(label: str) -> None:
    Effect.objects.create(workflow_id=current_workflow_id() or "", label=label)


@workflow
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@workflow
def write_values(key: str, values: list[Any], close: bool = True) -> int:
    for value in values:
        write_stream(key, value)
    if close:
        close_stream(key)
    return len(values)


@workflow
def write_many_keys(keys: list[str], count: int) -> None:
    for i in range(count):
        for key in keys:
            write_stream(key, f"{key}-{i}")


@step
def nap(seconds: float) -> None:
    time.sleep(seconds)


@step(atomic=True)
def counted(label: str) -> str:
    effect(label)
    return label


@step
def counted_plain(label: str) -> str:
    effect(label)
    return label


@workflow
def steady(count: int, delay: float, key: str = "out") -> int:
    """A value every ``delay`` seconds: each after an exactly-once step."""
    for i in range(count):
        counted(f"step-{i}")
        write_stream(key, i)
        nap(delay)
    close_stream(key)
    return count


@workflow
def counted_once(label: str) -> str:
    return counted_plain(label)


@workflow
def slow_then_write(delay: float) -> None:
    nap(delay)
    write_stream("out", "late")


@workflow
def fails(message: str) -> None:
    write_stream("out", "before")
    raise ValueError(message)


_attempts: dict[str, int] = {}


@step(retries=2, backoff=0.01)
def flaky(label: str, failures: int) -> str:
    effect(label)
    if Effect.objects.filter(label=label).count() <= failures:
        raise ConnectionError(f"attempt failed for {label}")
    return f"{label} ok"


@workflow
def retrying(label: str, failures: int) -> str:
    return flaky(label, failures)


@workflow
def catches_step_failure(label: str) -> str:
    from durable_streams import StepFailed

    try:
        flaky(label, 10)
    except StepFailed as exc:
        return f"{exc.error_type}: {exc.message}"
    return "no failure"


@step(retries=1, backoff=0)
def writes_then_fails_once(label: str) -> None:
    write_stream("tokens", "a")
    write_stream("tokens", "b")
    effect(label)
    if Effect.objects.filter(label=label).count() == 1:
        raise ConnectionError("first attempt fails after two writes")


@workflow
def step_writer(label: str) -> None:
    writes_then_fails_once(label)
    close_stream("tokens")


@workflow
def write_after_close() -> str:
    write_stream("out", 1)
    close_stream("out")
    close_stream("out")
    try:
        write_stream("out", 2)
    except StreamClosed as exc:
        return str(exc)
    return "written"


@workflow
def bad_value() -> str:
    write_stream("out", "ok")
    try:
        write_stream("out", {"nested": [object()]})
    except TypeError as exc:
        return str(exc)
    return "written"


@workflow
def returns_object() -> object:
    return object()


@workflow
def parent(count: int) -> list[str]:
    handles = [echo.start(i) for i in range(count)]
    return [h.workflow_id for h in handles]


@step
def step_a() -> str:
    return "a"


@workflow
def one_step() -> str:
    counted_plain("one-step")
    return step_a()


@workflow
def swallow_everything() -> str:
    try:
        return step_a()
    except Exception:
        return "swallowed"


@workflow(name="tests.custom-name", queue="other", max_attempts=2)
def custom() -> str:
    return "custom"
