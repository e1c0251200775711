"""The process-wide map from workflow names to their functions."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .exceptions import WorkflowNotRegistered

if TYPE_CHECKING:
    from .api import Workflow

_lock = threading.Lock()
_workflows: dict[str, Workflow[..., Any]] = {}


def register(workflow: Workflow[..., Any]) -> None:
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


def get(name: str) -> Workflow[..., Any]:
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
