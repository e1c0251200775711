"""The DURABLE_STREAMS setting and the system checks E001 to E004 and W001."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from durable_streams import checks
from durable_streams.conf import DEFAULTS, get_config
from durable_streams.exceptions import ConfigurationError, DurableStreamsError


def ids(messages: list[CheckMessage]) -> list[str]:
    return [m.id for m in messages if m.id and m.id != "durable_streams.W002"]


# get_config


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"LEASE_SECONDS": "soon"}, "['LEASE_SECONDS'] must be a number, not str"),
        ({"LEASE_SECONDS": True}, "['LEASE_SECONDS'] must be a number, not bool"),
        ({"LEASE_SECONDS": 0.1}, "['LEASE_SECONDS'] must be at least 0.5, not 0.1"),
        ({"LEASE_SECONDS": float("nan")}, "['LEASE_SECONDS'] must be a finite number, not nan"),
        ({"POLL_INTERVAL": float("inf")}, "['POLL_INTERVAL'] must be a finite number, not inf"),
        ({"POLL_INTERVAL": 0}, "['POLL_INTERVAL'] must be at least 0.001"),
        ({"NOTIFY_FALLBACK_POLL": None}, "['NOTIFY_FALLBACK_POLL'] must be a number"),
        ({"MAX_VALUE_BYTES": 1.5}, "['MAX_VALUE_BYTES'] must be a whole number, not 1.5"),
        ({"MAX_VALUE_BYTES": 0}, "['MAX_VALUE_BYTES'] must be at least 1"),
        ({"READ_BATCH_SIZE": "500"}, "['READ_BATCH_SIZE'] must be a number, not str"),
        ({"READER_WINDOW_BYTES": 0}, "['READER_WINDOW_BYTES'] must be at least 1, not 0"),
        ({"READER_WINDOW_BYTES": 1e6}, "['READER_WINDOW_BYTES'] must be a whole number"),
        ({"READER_STALL_SECONDS": 0}, "['READER_STALL_SECONDS'] must be at least 0.01, not 0"),
        ({"MAX_ATTEMPTS": 0}, "['MAX_ATTEMPTS'] must be at least 1"),
        ({"READER_RETRY_SECONDS": -1}, "['READER_RETRY_SECONDS'] must be at least 0.0"),
        ({"SHUTDOWN_GRACE_SECONDS": -1}, "['SHUTDOWN_GRACE_SECONDS'] must be at least 0.0"),
        ({"REAUTHORIZE_SECONDS": 0}, "['REAUTHORIZE_SECONDS'] must be at least 0.01, not 0"),
        ({"HEARTBEAT_SECONDS": 0}, "['HEARTBEAT_SECONDS'] must be a positive number or None"),
        ({"HEARTBEAT_SECONDS": float("nan")}, "['HEARTBEAT_SECONDS'] must be a positive number"),
        (
            {"LEASE_SECONDS": 3, "HEARTBEAT_SECONDS": 3},
            "['HEARTBEAT_SECONDS'] (3) must be shorter than LEASE_SECONDS (3.0)",
        ),
        ({"LISTEN_NOTIFY": "yes"}, "['LISTEN_NOTIFY'] must be True or False, not 'yes'"),
        (
            {"FLUSH_EACH_CHECKPOINT": 1},
            "['FLUSH_EACH_CHECKPOINT'] must be True or False, not 1",
        ),
        (
            {"PREPARED_STATEMENTS": None},
            "['PREPARED_STATEMENTS'] must be True or False, not None",
        ),
        ({"AUTHORIZE_READER": ""}, "['AUTHORIZE_READER'] must be a non-empty string"),
        ({"DATABASE": None}, "['DATABASE'] must be a non-empty string, not None"),
        ({"LEASE_SECOND": 3}, "['LEASE_SECOND'] is not a known setting (known: AUTHORIZE_READER"),
        # Huge ints made math.isfinite() raise OverflowError; huge floats passed and then
        # overflowed timedelta() in the worker and the readers.
        ({"LEASE_SECONDS": 10**400}, "['LEASE_SECONDS'] must be at most 86400, not a number of"),
        ({"LEASE_SECONDS": 10**5000}, "must be at most 86400, not a number of about 5001 digits"),
        ({"LEASE_SECONDS": 1e300}, "['LEASE_SECONDS'] must be at most 86400, not 1e+300"),
        ({"LEASE_SECONDS": -(10**400)}, "['LEASE_SECONDS'] must be at least 0.5, not a number"),
        ({"POLL_INTERVAL": 1e300}, "['POLL_INTERVAL'] must be at most 60, not 1e+300"),
        ({"POLL_INTERVAL": 61}, "['POLL_INTERVAL'] must be at most 60, not 61"),
        ({"NOTIFY_FALLBACK_POLL": 3601}, "['NOTIFY_FALLBACK_POLL'] must be at most 3600"),
        ({"SHUTDOWN_GRACE_SECONDS": 1e20}, "['SHUTDOWN_GRACE_SECONDS'] must be at most 86400"),
        ({"MAX_VALUE_BYTES": 2**40}, "['MAX_VALUE_BYTES'] must be at most 67108864"),
        ({"READ_BATCH_SIZE": 10**6}, "['READ_BATCH_SIZE'] must be at most 10000, not 1000000"),
        ({"MAX_ATTEMPTS": 2**31}, "['MAX_ATTEMPTS'] must be at most 1000000"),
        ({"HEARTBEAT_SECONDS": 10**400}, "['HEARTBEAT_SECONDS'] (a number of about 401 digits)"),
        ({"HEARTBEAT_SECONDS": 1e300}, "['HEARTBEAT_SECONDS'] (1e+300) must be shorter than"),
    ],
)
def test_invalid_settings_name_the_setting(value: dict[str, Any], problem: str) -> None:
    with override_settings(DURABLE_STREAMS=value), pytest.raises(ConfigurationError) as info:
        get_config()
    assert str(info.value).startswith("settings.DURABLE_STREAMS[")
    assert problem in str(info.value)
    # Callers may catch it as Django's own configuration error, or as ours.
    assert isinstance(info.value, ImproperlyConfigured)
    assert isinstance(info.value, DurableStreamsError)


@pytest.mark.parametrize(
    "value",
    [{"LEASE_SECONDS": 10**400}, {"LEASE_SECONDS": 1e300}, {"POLL_INTERVAL": 1e300}],
)
def test_manage_py_check_reports_out_of_range_settings(value: dict[str, Any]) -> None:
    # An OverflowError traceback before; now the check names the setting.
    with (
        override_settings(DURABLE_STREAMS=value),
        pytest.raises(SystemCheckError, match=r"durable_streams\.E001.*must be at most"),
    ):
        call_command("check")


def test_the_largest_values_in_range_are_usable() -> None:
    largest = {
        "LEASE_SECONDS": 86_400,
        "HEARTBEAT_SECONDS": 86_399.5,
        "POLL_INTERVAL": 60,
        "NOTIFY_FALLBACK_POLL": 3_600,
        "SHUTDOWN_GRACE_SECONDS": 86_400,
        "MAX_VALUE_BYTES": 64 * 1024 * 1024,
        "READ_BATCH_SIZE": 10_000,
        "MAX_ATTEMPTS": 1_000_000,
    }
    with override_settings(DURABLE_STREAMS=largest):
        config = get_config()
        assert ids(checks.check_settings()) == []
    assert (config.LEASE_SECONDS, config.POLL_INTERVAL) == (86_400.0, 60.0)


def test_the_setting_must_be_a_dict() -> None:
    with (
        override_settings(DURABLE_STREAMS=[("LEASE_SECONDS", 3)]),
        pytest.raises(ConfigurationError, match="DURABLE_STREAMS must be a dict, not list"),
    ):
        get_config()


def test_defaults_and_derived_values() -> None:
    with override_settings(DURABLE_STREAMS={}):
        config = get_config()
    assert config.LEASE_SECONDS == DEFAULTS["LEASE_SECONDS"] == 10.0
    assert pytest.approx(10.0) == config.HEARTBEAT_SECONDS * 3
    assert (config.MAX_VALUE_BYTES, config.READ_BATCH_SIZE) == (1024 * 1024, 500)
    assert (config.READER_WINDOW_BYTES, config.READER_STALL_SECONDS) == (1024 * 1024, 60.0)
    with override_settings(DURABLE_STREAMS={"LEASE_SECONDS": 2, "MAX_ATTEMPTS": 3}):
        config = get_config()
    # Whole numbers where seconds are meant become floats.
    assert (config.LEASE_SECONDS, type(config.LEASE_SECONDS)) == (2.0, float)
    assert (config.MAX_ATTEMPTS, type(config.MAX_ATTEMPTS)) == (3, int)


def test_the_config_is_cached_and_reset_when_the_setting_changes() -> None:
    first = get_config()
    assert get_config() is first
    lease = settings.DURABLE_STREAMS["LEASE_SECONDS"]
    assert lease == first.LEASE_SECONDS
    with override_settings(DURABLE_STREAMS={**settings.DURABLE_STREAMS, "LEASE_SECONDS": 7}):
        changed = get_config()
        assert changed.LEASE_SECONDS == 7.0
        assert get_config() is changed
    assert get_config().LEASE_SECONDS == first.LEASE_SECONDS
    assert get_config() is not changed


# System checks


@contextmanager
def databases(**extra: dict[str, Any]) -> Iterator[None]:
    """Add database aliases for a check to look at; Django warns about overriding DATABASES."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Overriding setting DATABASES")
        with override_settings(DATABASES={**settings.DATABASES, **extra}):
            yield


def test_e001_invalid_settings() -> None:
    with override_settings(DURABLE_STREAMS={"LEASE_SECONDS": "soon"}):
        messages = checks.check_settings()
    assert ids(messages) == ["durable_streams.E001"]
    assert "settings.DURABLE_STREAMS['LEASE_SECONDS'] must be a number" in messages[0].msg
    assert messages[0].hint


def test_e001_is_registered_with_django_checks() -> None:
    with (
        override_settings(DURABLE_STREAMS={"MAX_ATTEMPTS": 0}),
        pytest.raises(SystemCheckError, match=r"durable_streams\.E001"),
    ):
        call_command("check")


def test_no_message_for_valid_settings() -> None:
    assert ids(checks.check_settings()) == []
    call_command("check")  # nothing of ours fails


def test_e002_database_alias_not_in_databases() -> None:
    with override_settings(DURABLE_STREAMS={"DATABASE": "missing"}):
        messages = checks.check_settings()
    assert ids(messages) == ["durable_streams.E002"]
    assert "'missing', which is not in settings.DATABASES" in messages[0].msg
    assert "'default'" in messages[0].hint


def test_no_e002_for_a_configured_alias() -> None:
    with (
        databases(other=dict(settings.DATABASES["default"])),
        override_settings(DURABLE_STREAMS={"DATABASE": "other"}),
    ):
        assert ids(checks.check_settings()) == []


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("tests.no_such_module.authorize", "cannot be imported"),
        ("tests.settings.SECRET_KEY", "is not callable"),
    ],
)
def test_e003_authorize_reader_unusable(path: str, problem: str) -> None:
    with override_settings(DURABLE_STREAMS={"AUTHORIZE_READER": path}):
        messages = checks.check_settings()
    assert ids(messages) == ["durable_streams.E003"]
    assert f"['AUTHORIZE_READER'] names {path!r}" in messages[0].msg
    assert problem in messages[0].msg


def test_no_e003_for_a_callable() -> None:
    with override_settings(DURABLE_STREAMS={"AUTHORIZE_READER": "tests.workflows.effect"}):
        assert ids(checks.check_settings()) == []


POSTGRES = {"ENGINE": "django.db.backends.postgresql", "NAME": "unused"}


def test_w001_postgresql_without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec

    def without_psycopg(name: str, *args: Any) -> Any:
        return None if name == "psycopg" else find_spec(name, *args)

    monkeypatch.setattr(checks.importlib.util, "find_spec", without_psycopg)
    with databases(pg=POSTGRES), override_settings(DURABLE_STREAMS={"DATABASE": "pg"}):
        messages = checks.check_settings()
    assert ids(messages) == ["durable_streams.W001"]
    assert "psycopg 3" in messages[0].msg
    assert "durable-streams[postgres]" in messages[0].hint

    # Nothing to warn about when notifications are off.
    with (
        databases(pg=POSTGRES),
        override_settings(DURABLE_STREAMS={"DATABASE": "pg", "LISTEN_NOTIFY": False}),
    ):
        assert ids(checks.check_settings()) == []


def test_no_w001_with_psycopg_installed() -> None:
    # Runs where the postgres extra is installed (the PostgreSQL run).
    pytest.importorskip("psycopg")
    with databases(pg=POSTGRES), override_settings(DURABLE_STREAMS={"DATABASE": "pg"}):
        assert ids(checks.check_settings()) == []


@pytest.mark.parametrize(
    ("layers", "where"),
    [
        ({"default": "redis"}, "settings.CHANNEL_LAYERS['default'] must be a dict, not str"),
        ("redis", "settings.CHANNEL_LAYERS must be a dict, not str"),
        ([("default", {})], "settings.CHANNEL_LAYERS must be a dict, not list"),
    ],
)
def test_e004_channel_layers_of_the_wrong_shape(layers: Any, where: str) -> None:
    # check_live_delivery called .get() on the str: a traceback from manage.py check.
    with override_settings(CHANNEL_LAYERS=layers):
        (message,) = checks.check_live_delivery()
        assert message.id == "durable_streams.E004"
        assert message.msg == where + "."
        assert "RedisChannelLayer" in message.hint
        with pytest.raises(SystemCheckError, match=r"durable_streams\.E004"):
            call_command("check")
