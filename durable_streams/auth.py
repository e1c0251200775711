"""Who may read a workflow's streams."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from django.utils.module_loading import import_string

from .conf import get_config
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .models import Workflow


class ReaderAuthorization(Protocol):
    def __call__(self, user: Any, workflow: Workflow, key: str) -> bool: ...


def default_authorize_reader(user: Any, workflow: Workflow, key: str) -> bool:
    """Public workflows: anyone. Otherwise staff, and the user who started the workflow."""
    if workflow.is_public:
        return True
    if user is None or not getattr(user, "is_authenticated", False):
        return False
    if getattr(user, "is_staff", False):
        return True
    return workflow.owner_id is not None and workflow.owner_id == user.pk


@cache
def _load(path: str) -> ReaderAuthorization:
    try:
        function = import_string(path)
    except ImportError as exc:
        raise ConfigurationError(
            f"settings.DURABLE_STREAMS['AUTHORIZE_READER'] names {path!r}, "
            f"which cannot be imported: {exc}"
        ) from exc
    if not callable(function):
        raise ConfigurationError(
            f"settings.DURABLE_STREAMS['AUTHORIZE_READER'] names {path!r}, which is not callable."
        )
    return function  # type: ignore[no-any-return]


def can_read(user: Any, workflow: Workflow, key: str) -> bool:
    return bool(_load(get_config().AUTHORIZE_READER)(user, workflow, key))
