"""The process-wide map from workflow names to their functions."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol

from ..cron import Schedule
from ..exceptions import WorkflowNotRegistered


class Registered(Protocol):
    """What the registry knows of a workflow (``api.WorkflowFunction`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def queue(self) -> str: ...

    @property
    def fn(self) -> Callable[..., Any]: ...

    @property
    def schedule(self) -> Schedule | None: ...


_lock = threading.Lock()
_workflows: dict[str, Registered] = {}


def register(workflow: Registered) -> None:
    with _lock:
        existing = _workflows.get(workflow.name)
        if existing is not None and existing.fn is not workflow.fn:
            existing_fn = f"{existing.fn.__module__}.{existing.fn.__qualname__}"
            new_fn = f"{workflow.fn.__module__}.{workflow.fn.__qualname__}"
            if existing_fn != new_fn:
                raise ValueError(
                    f"Workflow name {workflow.name!r} is already registered for {existing_fn}; "
                    f"pass @workflow(name=...) to give {new_fn} another name."
                )
        _workflows[workflow.name] = workflow


def get(name: str) -> Registered:
    try:
        return _workflows[name]
    except KeyError:
        raise WorkflowNotRegistered(
            f"No workflow is registered under the name {name!r} in this process. "
            "Is the module that defines it imported (a workflows.py module of an installed app)?"
        ) from None


def names() -> list[str]:
    with _lock:
        return list(_workflows)


def queue_of(name: str) -> str | None:
    """The default queue of the workflow registered as ``name``, if any."""
    with _lock:
        workflow = _workflows.get(name)
    return None if workflow is None else workflow.queue


def scheduled(queues: Collection[str]) -> list[Registered]:
    """The registered workflows with a schedule whose default queue is one of ``queues``."""
    with _lock:
        workflows = list(_workflows.values())
    return [wf for wf in workflows if wf.schedule is not None and wf.queue in queues]
