"""System checks. Every id is listed, with its meaning, in the README."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from . import telemetry
from .auth import _load
from .backends import check_database, check_server
from .bus import uses_listen_notify
from .conf import get_config
from .db import alias
from .exceptions import ConfigurationError


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        config = get_config()
    except ConfigurationError as exc:
        return [
            Error(
                str(exc),
                hint="See the settings reference in durable_streams' README.",
                id="durable_streams.E001",
            )
        ]
    messages: list[CheckMessage] = []
    if config.DATABASE not in settings.DATABASES:
        messages.append(
            Error(
                f"settings.DURABLE_STREAMS['DATABASE'] is {config.DATABASE!r}, which is not in "
                "settings.DATABASES.",
                hint=f"Use one of: {', '.join(map(repr, settings.DATABASES))}.",
                id="durable_streams.E002",
            )
        )
    try:
        _load(config.AUTHORIZE_READER)
    except ConfigurationError as exc:
        messages.append(
            Error(
                str(exc),
                hint="Give the dotted path of a function (user, workflow, key) -> bool.",
                id="durable_streams.E003",
            )
        )
    if config.DATABASE in settings.DATABASES:
        messages += check_database(config.DATABASE)
    if config.TELEMETRY and not telemetry.available():
        messages.append(
            Error(
                "settings.DURABLE_STREAMS['TELEMETRY'] is True, but the OpenTelemetry API "
                "(opentelemetry-api) is not installed.",
                hint=telemetry.INSTALL_HINT,
                id="durable_streams.E008",
            )
        )
    return messages


@register(Tags.database)
def check_database_server(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """The server's version; run by ``migrate`` and ``check --database``, which connect."""
    try:
        using = get_config().DATABASE
    except ConfigurationError:
        return []  # E001 says why
    if using not in settings.DATABASES or using not in (databases or ()):
        return []
    return check_server(using)


@register()
def check_live_delivery(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Stream sockets need a channel layer that reaches the worker processes to be pushed to."""
    if not apps.is_installed("channels"):
        return []
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    default = layers.get("default", {}) if isinstance(layers, dict) else None
    if not isinstance(default, dict):
        # Channels fails on it only when a socket first asks for the layer.
        wrong = layers if default is None else default
        where = "CHANNEL_LAYERS" if default is None else "CHANNEL_LAYERS['default']"
        return [
            Error(
                f"settings.{where} must be a dict, not {type(wrong).__name__}.",
                hint=(
                    'Write CHANNEL_LAYERS = {"default": {"BACKEND": '
                    '"channels_redis.core.RedisChannelLayer", "CONFIG": {...}}}.'
                ),
                id="durable_streams.E004",
            )
        ]
    backend = default.get("BACKEND")
    if backend not in (None, "channels.layers.InMemoryChannelLayer"):
        return []
    try:
        interval = get_config().POLL_INTERVAL
    except ConfigurationError:
        return []  # E001 says why
    layer = "no channel layer" if backend is None else "the in-memory channel layer"
    try:
        notified = uses_listen_notify(alias())
    except Exception:
        notified = False  # an unusable database: E005 or E006 says why
    if notified:
        how = (
            "through the database's notifications: the readers of each stream in a "
            "process re-read the database after every batch a worker commits"
        )
    else:
        how = (
            f"by polling: each open stream re-reads the database every {interval}s (POLL_INTERVAL)"
        )
    return [
        Warning(
            f"With {layer}, values that worker processes write reach WebSocket and SSE "
            f"readers {how}.",
            hint=(
                "Fine for development, or with workers inside the web process. For push "
                "delivery across processes, and fewer queries, set CHANNEL_LAYERS to "
                "channels_redis.core.RedisChannelLayer."
            ),
            id="durable_streams.W002",
        )
    ]
