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
from .waiting import poll


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


def _fails_at_first(label: str, failures: int) -> str:
    """Fails its first ``failures`` tries (counted as Effect rows), then succeeds."""
    effect(label)
    if Effect.objects.filter(label=label).count() <= failures:
        raise ConnectionError(f"attempt failed for {label}")
    return f"{label} ok"


@step(retries=2, backoff=0.01)
def flaky(label: str, failures: int) -> str:
    return _fails_at_first(label, failures)


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


# Workflows of the core contract suite (test_api, test_streams, test_replay, test_worker,
# test_processes).


def worker_effect(label: str) -> None:
    """Record a side effect together with the worker that ran it."""
    from durable_streams.runtime.execution import current_execution

    execution = current_execution()
    Effect.objects.create(
        workflow_id=current_workflow_id() or "",
        label=label,
        worker=execution.worker_id if execution is not None else "",
    )


def wait_for_effect(label: str, timeout: float = 20.0) -> bool:
    """Block until the test creates an Effect with ``label`` (a release signal); bounded."""
    return poll(Effect.objects.filter(label=label).exists, timeout=timeout)


@step
def counted_worker(label: str) -> str:
    worker_effect(label)
    return label


@step
def sleepy_effect(label: str, seconds: float) -> str:
    """Sleep, then record the effect: a step that is still running when a signal arrives."""
    time.sleep(seconds)
    worker_effect(label)
    return label


@workflow
def replayable(label: str) -> list[Any]:
    first = counted_plain(label)
    write_stream("out", first)
    second = step_a()
    write_stream("out", second)
    return [first, second]


@workflow
def writes_then_step(label: str) -> str:
    write_stream("out", "w0")
    write_stream("out", "w1")
    return counted_plain(label)


def _unencodable(kind: str) -> Any:
    if kind == "object":
        return {"nested": [object()]}
    if kind == "nan":
        return [1.0, float("nan")]
    if kind == "set":
        return {1, 2}
    if kind == "circular":
        loop: list[Any] = []
        loop.append(loop)
        return loop
    if kind == "bad_dict_key":
        return {(1, 2): "tuple key"}
    if kind == "deep":
        return nested(100_000)
    raise ValueError(kind)


def nested(levels: int) -> list[Any]:
    """A list inside a list, ``levels`` deep: deeper than the interpreter's recursion limit."""
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@workflow
def probe_writes(cases: list[dict[str, Any]]) -> list[str]:
    """Run each write or close and report what happened, so a test can see the errors."""
    outcomes = []
    for case in cases:
        key = case["key"]
        try:
            if case.get("close"):
                close_stream(key)
            elif "unencodable" in case:
                write_stream(key, _unencodable(case["unencodable"]))
            else:
                write_stream(key, case["value"])
        except (TypeError, ValueError, StreamClosed) as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes.append("ok")
    return outcomes


@step
def write_then_wait(label: str) -> str:
    write_stream("tokens", "first")
    if not wait_for_effect(f"{label}-release"):
        raise TimeoutError("the test never released the step")
    write_stream("tokens", "second")
    return "done"


@workflow
def step_streams_live(label: str) -> str:
    result = write_then_wait(label)
    close_stream("tokens")
    return result


_atomic_attempts: dict[str, int] = {}


@step(atomic=True, retries=3, backoff=0)
def atomic_flaky(label: str, failures: int) -> str:
    effect(label)
    _atomic_attempts[label] = _atomic_attempts.get(label, 0) + 1
    if _atomic_attempts[label] <= failures:
        raise ConnectionError(f"attempt {_atomic_attempts[label]} of {label} failed")
    return f"{label} ok"


@workflow
def atomic_rollback(label: str, failures: int) -> str:
    return atomic_flaky(label, failures)


@step
def returns_set() -> Any:
    return {1, 2}


@step(atomic=True)
def returns_set_atomic() -> Any:
    return {1, 2}


@workflow
def bad_step_result(atomic: bool) -> Any:
    return returns_set_atomic() if atomic else returns_set()


@step
def returns_deep() -> Any:
    return nested(100_000)


@step(atomic=True)
def returns_deep_atomic() -> Any:
    return nested(100_000)


@workflow
def deep_step_result(atomic: bool) -> Any:
    return returns_deep_atomic() if atomic else returns_deep()


@workflow
def deep_result() -> Any:
    return nested(100_000)


@step(retries=2, backoff=0.1)
def flaky_backoff(label: str, failures: int) -> str:
    return _fails_at_first(label, failures)


@workflow
def retrying_backoff(label: str, failures: int) -> str:
    return flaky_backoff(label, failures)


@workflow
def cancellable(label: str, count: int, delay: float) -> int:
    """A non-atomic counted step, a progress value, then a pause: a cancel lands in the pause."""
    for i in range(count):
        counted_plain(f"{label}-{i}")
        write_stream("progress", i)
        nap(delay)
    return count


@workflow
def graceful(label: str, seconds: float | None) -> str:
    """Two steps; the first one takes ``seconds``, or with None runs until the test releases it."""
    write_stream("progress", "started")
    if seconds is None:
        released_effect(f"{label}-1")
    else:
        sleepy_effect(f"{label}-1", seconds)
    write_stream("progress", "between")
    sleepy_effect(f"{label}-2", 0)
    close_stream("progress")
    return "done"


@step
def released_effect(label: str) -> str:
    """Wait for the test's release (an Effect ``<label>-release``), then record the effect."""
    if not wait_for_effect(f"{label}-release", 60):
        raise TimeoutError(f"{label} was never released")
    worker_effect(label)
    return label


@workflow
def claim_race(label: str) -> str:
    # Hold the slot a moment, off any lock: one worker must not drain the queue while
    # the other is still waiting for SQLite's write lock.
    time.sleep(0.05)
    return counted_worker(label)


@workflow
def parent_after_write(count: int) -> list[str]:
    write_stream("out", "before children")
    ids = [echo.start(i).workflow_id for i in range(count)]
    write_stream("out", "after children")
    return ids


@workflow(max_attempts=2)
def two_attempts() -> str:
    return "finished"


@workflow(queue="other")
def on_other_queue() -> str:
    return "other"


@workflow
def returns_step_tuple() -> Any:
    value = step_tuple()
    return [type(value).__name__, value]


@step
def step_tuple() -> Any:
    return (1, "two", [3.5])


@step(atomic=True)
def slow_atomic(label: str, seconds: float) -> str:
    time.sleep(seconds)
    worker_effect(label)
    return label


@workflow
def long_atomic(label: str, seconds: float) -> str:
    return slow_atomic(label, seconds)


from .workflows_atomic import atomic_stream_writer  # noqa: E402, F401 - registers it
from .workflows_faults import two_steps  # noqa: E402, F401 - registers the fault tests' workflows
from .workflows_interrupted import interruptible  # noqa: E402, F401 - registers it
from .workflows_schedules import yearly  # noqa: E402, F401 - registers the schedule tests' workflows
from .workflows_storm import storm  # noqa: E402, F401 - registers it
from .workflows_waiting import napper  # noqa: E402, F401 - registers the wait tests' workflows


@workflow
def greet(name: str, queue: str = "no queue given") -> dict[str, str]:
    """A parameter named like a start option: ``start()`` passes it, ``start_workflow`` cannot."""
    return {"name": name, "queue": queue}


@workflow
def summarize(text: str) -> str:
    return text[:10]


@workflow
def parent_with_bad_child() -> dict[str, str]:
    """Starts a child without its argument, then a good child."""
    try:
        summarize.start()
    except TypeError as exc:
        error = str(exc)
    else:
        error = ""
    return {"error": error, "next_child": echo.start("after").workflow_id}
