"""The ``DURABLE_STREAMS`` setting: defaults, validation and a cached getter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import ConfigurationError

DEFAULTS: dict[str, Any] = {
    # Seconds a worker's claim on a running workflow lasts without renewal.
    "LEASE_SECONDS": 10.0,
    # Seconds between lease renewals; None means a third of LEASE_SECONDS.
    "HEARTBEAT_SECONDS": None,
    # Seconds between the beats by which a worker says, in its row of the worker
    # processes table, that it is alive; a row not refreshed for 3 of them counts as gone.
    "WORKER_HEARTBEAT_SECONDS": 10.0,
    # Seconds between database polls where no notification channel reaches the
    # process (SQLite across processes, or a missed PostgreSQL notification).
    "POLL_INTERVAL": 0.1,
    # Upper bound, in seconds, of a wait on PostgreSQL before re-reading the
    # database even though LISTEN/NOTIFY should have woken the waiter.
    "NOTIFY_FALLBACK_POLL": 1.0,
    # Use PostgreSQL LISTEN/NOTIFY to wake readers and idle workers.
    "LISTEN_NOTIFY": True,
    # On PostgreSQL, make the checkpoint of a step that wrote nothing wait for its own
    # disk flush. By default it does not; the next stream value or workflow end,
    # which does wait, makes it durable too (see README, "Steps run at least once").
    "FLUSH_EACH_CHECKPOINT": False,
    # On PostgreSQL, prepare durable_streams' own per-step statements once per
    # connection (Django's queries are left as they are). False behind a pooler that
    # cannot keep prepared statements (PgBouncer in transaction mode before 1.21).
    "PREPARED_STATEMENTS": True,
    # Largest encoded size of one stream value, in bytes.
    "MAX_VALUE_BYTES": 1024 * 1024,
    # Largest encoded size of the inputs (arguments) of one start, in bytes.
    "MAX_INPUT_BYTES": 1024 * 1024,
    # How many entries one catch-up query reads.
    "READ_BATCH_SIZE": 500,
    # Seconds read_stream() and result() keep reconnecting to a failing database.
    "READER_RETRY_SECONDS": 60.0,
    # Most entry data, in bytes, one WebSocket may have sent beyond the client's last
    # acknowledgement, and one SSE response may carry before it ends (the client
    # reconnects from its offset).
    "READER_WINDOW_BYTES": 1024 * 1024,
    # Seconds a WebSocket client may leave a full window unacknowledged before it is
    # closed with 4408 (it reconnects from its offset).
    "READER_STALL_SECONDS": 60.0,
    # Seconds without any frame after which a WebSocket reader gets a heartbeat frame
    # and an SSE response a keep-alive comment, so that clients can tell a quiet
    # stream from a lost connection (the JS client gives up after 3 of them).
    "READER_HEARTBEAT_SECONDS": 15.0,
    # Claims per workflow before it ends in ERROR; the default for @workflow.
    "MAX_ATTEMPTS": 10,
    # Seconds a sleep or a recv in a workflow body waits in place, holding its worker
    # slot and lease; a longer wait suspends the run (status WAITING): it frees the
    # slot and the lease, and any worker claims it again when its timer is due or its
    # message arrives. 0 suspends every wait at once.
    "SUSPEND_AFTER_SECONDS": 1.0,
    # Seconds a stopping worker waits for running steps before it releases leases.
    "SHUTDOWN_GRACE_SECONDS": 30.0,
    # Callable (dotted path) deciding who may read a stream: (user, workflow, key) -> bool.
    "AUTHORIZE_READER": "durable_streams.auth.default_authorize_reader",
    # Seconds between checks, while a reader reads, that AUTHORIZE_READER still lets it.
    "REAUTHORIZE_SECONDS": 60.0,
    # Database alias holding durable_streams' tables.
    "DATABASE": "default",
    # Days an ended run is kept before ``manage.py durable_streams_prune`` deletes it
    # (with its steps and streams); None keeps everything unless --older-than is given.
    "RETENTION_DAYS": None,
    # Report OpenTelemetry spans and metrics (needs the [otel] extra).
    "TELEMETRY": False,
}

# Inclusive lower bounds; beyond the maxima below a value is a mistake (a day-long poll)
# or overflows the arithmetic it meets (timedelta, float) far from where it was set.
_NUMBERS: dict[str, tuple[type[int | float], float]] = {
    "LEASE_SECONDS": (float, 0.5),
    "WORKER_HEARTBEAT_SECONDS": (float, 0.05),
    "POLL_INTERVAL": (float, 0.001),
    "NOTIFY_FALLBACK_POLL": (float, 0.01),
    "MAX_VALUE_BYTES": (int, 1),
    "MAX_INPUT_BYTES": (int, 1),
    "READ_BATCH_SIZE": (int, 1),
    "READER_RETRY_SECONDS": (float, 0.0),
    "READER_WINDOW_BYTES": (int, 1),
    "READER_STALL_SECONDS": (float, 0.01),
    "READER_HEARTBEAT_SECONDS": (float, 0.05),
    "MAX_ATTEMPTS": (int, 1),
    "SHUTDOWN_GRACE_SECONDS": (float, 0.0),
    "SUSPEND_AFTER_SECONDS": (float, 0.0),
    "REAUTHORIZE_SECONDS": (float, 0.01),
}

DAY = 86_400
MAXIMA: dict[str, int] = {
    "LEASE_SECONDS": DAY,
    "WORKER_HEARTBEAT_SECONDS": 3_600,
    "POLL_INTERVAL": 60,
    "NOTIFY_FALLBACK_POLL": 3_600,
    "MAX_VALUE_BYTES": 64 * 1024 * 1024,
    "MAX_INPUT_BYTES": 64 * 1024 * 1024,
    "READ_BATCH_SIZE": 10_000,
    "MAX_ATTEMPTS": 1_000_000,
    "SHUTDOWN_GRACE_SECONDS": DAY,
    "SUSPEND_AFTER_SECONDS": 3_600,
    "READER_RETRY_SECONDS": DAY,
    "READER_WINDOW_BYTES": 64 * 1024 * 1024,
    "READER_STALL_SECONDS": DAY,
    # Proxies commonly close a connection idle for a minute or more.
    "READER_HEARTBEAT_SECONDS": 300,
    "RETENTION_DAYS": 36_500,
}


@dataclass(frozen=True)
class Config:
    LEASE_SECONDS: float
    HEARTBEAT_SECONDS: float
    WORKER_HEARTBEAT_SECONDS: float
    POLL_INTERVAL: float
    NOTIFY_FALLBACK_POLL: float
    LISTEN_NOTIFY: bool
    FLUSH_EACH_CHECKPOINT: bool
    PREPARED_STATEMENTS: bool
    MAX_VALUE_BYTES: int
    MAX_INPUT_BYTES: int
    READ_BATCH_SIZE: int
    READER_RETRY_SECONDS: float
    READER_WINDOW_BYTES: int
    READER_STALL_SECONDS: float
    READER_HEARTBEAT_SECONDS: float
    MAX_ATTEMPTS: int
    SUSPEND_AFTER_SECONDS: float
    SHUTDOWN_GRACE_SECONDS: float
    AUTHORIZE_READER: str
    REAUTHORIZE_SECONDS: float
    DATABASE: str
    RETENTION_DAYS: float | None
    TELEMETRY: bool


def _invalid(name: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"settings.DURABLE_STREAMS[{name!r}] {problem}.")


def _shown(value: float) -> str:
    # repr() of an int of more than 4,300 digits raises ValueError.
    if isinstance(value, int) and not -(10**30) < value < 10**30:
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return repr(value)


def _check_number(name: str, value: Any, kind: type[int | float], minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(name, f"must be a number, not {type(value).__name__}")
    # math.isfinite() of a huge int raises OverflowError: only floats can be inf or nan.
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(name, f"must be a finite number, not {value!r}")
    if kind is int and not isinstance(value, int):
        raise _invalid(name, f"must be a whole number, not {value!r}")
    if value < minimum:
        raise _invalid(name, f"must be at least {minimum}, not {_shown(value)}")
    maximum = MAXIMA.get(name)
    if maximum is not None and value > maximum:
        raise _invalid(name, f"must be at most {maximum}, not {_shown(value)}")
    return kind(value)


@cache
def get_config() -> Config:
    """Return the validated settings, merged over the defaults; cached until they change."""
    user = getattr(settings, "DURABLE_STREAMS", {})
    if not isinstance(user, dict):
        raise ConfigurationError(
            f"settings.DURABLE_STREAMS must be a dict, not {type(user).__name__}."
        )
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise _invalid(unknown[0], f"is not a known setting (known: {', '.join(sorted(DEFAULTS))})")
    values = {**DEFAULTS, **user}
    for name, (kind, minimum) in _NUMBERS.items():
        values[name] = _check_number(name, values[name], kind, minimum)
    heartbeat = values["HEARTBEAT_SECONDS"]
    if heartbeat is None:
        heartbeat = values["LEASE_SECONDS"] / 3
    elif (
        isinstance(heartbeat, bool)
        or not isinstance(heartbeat, (int, float))
        or (isinstance(heartbeat, float) and not math.isfinite(heartbeat))
        or heartbeat <= 0
    ):
        raise _invalid(
            "HEARTBEAT_SECONDS", f"must be a positive number or None, not {_shown(heartbeat)}"
        )
    if heartbeat >= values["LEASE_SECONDS"]:
        raise _invalid(
            "HEARTBEAT_SECONDS",
            f"({_shown(heartbeat)}) must be shorter than LEASE_SECONDS ({values['LEASE_SECONDS']})",
        )
    values["HEARTBEAT_SECONDS"] = float(heartbeat)
    if values["RETENTION_DAYS"] is not None:
        values["RETENTION_DAYS"] = _check_number(
            "RETENTION_DAYS", values["RETENTION_DAYS"], float, 0.0
        )
    for name in ("AUTHORIZE_READER", "DATABASE"):
        if not isinstance(values[name], str) or not values[name]:
            raise _invalid(name, f"must be a non-empty string, not {values[name]!r}")
    for name in (
        "LISTEN_NOTIFY",
        "FLUSH_EACH_CHECKPOINT",
        "PREPARED_STATEMENTS",
        "TELEMETRY",
    ):
        if not isinstance(values[name], bool):
            raise _invalid(name, f"must be True or False, not {values[name]!r}")
    return Config(**values)


@receiver(setting_changed)
def _reset_config(*, setting: str, **kwargs: Any) -> None:
    if setting in ("DURABLE_STREAMS", "DATABASES"):
        get_config.cache_clear()
