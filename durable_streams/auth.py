"""Who may read a workflow's streams."""

from __future__ import annotations

from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings
from django.contrib import auth as django_auth
from django.core.exceptions import ValidationError
from django.utils.crypto import constant_time_compare
from django.utils.module_loading import import_string

from .conf import get_config
from .db import alias
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .models import Workflow


class ReaderAuthorization(Protocol):
    def __call__(self, user: Any, workflow: Workflow, key: str) -> bool: ...


# The admin shows every workflow to a user with either (Django's has_view_permission).
VIEW_PERMISSIONS = ("durable_streams.view_workflow", "durable_streams.change_workflow")


def default_authorize_reader(user: Any, workflow: Workflow, key: str) -> bool:
    """Public workflows: anyone. Otherwise the user who started the workflow, and the
    users whom the admin shows every workflow (``durable_streams.view_workflow``;
    superusers have every permission). Being staff alone grants nothing."""
    if workflow.is_public:
        return True
    if user is None or not getattr(user, "is_authenticated", False):
        return False
    if workflow.owner_id is not None and workflow.owner_id == user.pk:
        return True
    has_perm = getattr(user, "has_perm", None)
    return has_perm is not None and any(has_perm(name) for name in VIEW_PERMISSIONS)


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
    # Callable, and the setting promises the signature: import_string() returns Any.
    return function  # type: ignore[no-any-return]


def can_read(user: Any, workflow: Workflow, key: str) -> bool:
    return bool(_load(get_config().AUTHORIZE_READER)(user, workflow, key))


def _anonymous() -> Any:
    # Imported here: django.contrib.auth.models needs the app registry, and this module
    # is imported by the routing that an ASGI module may load before Django is set up.
    from django.contrib.auth.models import AnonymousUser

    return AnonymousUser()


def session_user(session_key: str) -> Any:
    """The user signed in on session ``session_key`` now, else an AnonymousUser.

    It checks what Django's ``get_user()`` checks (the session exists and has not
    expired, its backend is configured, the user exists and may log in, the session's
    password hash matches the current password, or one under SECRET_KEY_FALLBACKS),
    but changes nothing: ``get_user()`` would flush or rotate the session, which is the
    browser's to do on its next request, not a reader's check.
    """
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    try:
        user_id = django_auth.get_user_model()._meta.pk.to_python(session[django_auth.SESSION_KEY])
        backend_path = session[django_auth.BACKEND_SESSION_KEY]
    except (KeyError, ValidationError):
        return _anonymous()
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return _anonymous()
    user = django_auth.load_backend(backend_path).get_user(user_id)
    if user is None:
        return _anonymous()
    if hasattr(user, "get_session_auth_hash"):
        stored = session.get(django_auth.HASH_SESSION_KEY)
        hashes = [user.get_session_auth_hash()]
        hashes += list(getattr(user, "get_session_auth_fallback_hash", list)())
        if not stored or not any(constant_time_compare(stored, h) for h in hashes):
            return _anonymous()
    return user


class ReaderAccess:
    """What a reader of one stream was let in with, to check again while it reads.

    Readers live for as long as their streams, and a session can be deleted, a password
    changed, a workflow made private or given to someone else meanwhile: the feed calls
    ``still_allowed()`` every ``REAUTHORIZE_SECONDS`` (see ``feed.StreamFeed``) and
    ends the reader once it returns False.
    """

    __slots__ = ("key", "session_key", "user", "workflow_id")

    def __init__(self, user: Any, session_key: str | None, workflow_id: str, key: str) -> None:
        self.user = user
        # The session the user was read from, if any. A user found another way (a
        # token, say) is kept as it was at connect; only the workflow is read again.
        self.session_key = session_key
        self.workflow_id = workflow_id
        self.key = key

    def still_allowed(self) -> bool:
        """Whether ``AUTHORIZE_READER`` lets the reader read on, from fresh rows (blocking).

        The session and the workflow are read again. A session that is gone, or whose
        user is someone else or no longer verifies, leaves the reader anonymous.
        """
        user = self.user
        if self.session_key is not None and getattr(user, "is_authenticated", False):
            current = session_user(self.session_key)
            same = getattr(current, "is_authenticated", False) and current.pk == user.pk
            user = current if same else _anonymous()
        return may_read(user, self.workflow_id, self.key)


def may_read(user: Any, workflow_id: str, key: str) -> bool:
    """Whether ``user`` may read the stream (blocking): False for a missing workflow too.

    A reader who may not read a stream is told what it would be told for a missing
    workflow, so that nobody can probe which ids exist; the socket and the event
    stream each say so in their own protocol.
    """
    # Imported here: the models need the app registry, and this module is imported by
    # the routing that an ASGI module may load before Django is set up.
    from .models import Workflow

    # The JSON columns can be large and the default rule needs none of them; a custom
    # rule that reads one still gets it, loaded on access.
    workflow = (
        Workflow.objects.using(alias())
        .defer("inputs", "output", "error")
        .filter(pk=workflow_id)
        .first()
    )
    return workflow is not None and can_read(user, workflow, key)
