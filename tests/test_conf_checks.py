"""The DURABLE_STREAMS setting and the system checks E001 to E007, W002 and W003."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings

from durable_streams import backends, checks
from durable_streams.backends import postgresql
from durable_streams.backends.mysql import MySQLBackend
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
        ({"READER_HEARTBEAT_SECONDS": 0}, "['READER_HEARTBEAT_SECONDS'] must be at least 0.05"),
        ({"READER_HEARTBEAT_SECONDS": 301}, "['READER_HEARTBEAT_SECONDS'] must be at most 300"),
        ({"READER_HEARTBEAT_SECONDS": "15"}, "['READER_HEARTBEAT_SECONDS'] must be a number"),
        ({"READER_RETRY_SECONDS": -1}, "['READER_RETRY_SECONDS'] must be at least 0.0"),
        ({"SHUTDOWN_GRACE_SECONDS": -1}, "['SHUTDOWN_GRACE_SECONDS'] must be at least 0.0"),
        ({"REAUTHORIZE_SECONDS": 0}, "['REAUTHORIZE_SECONDS'] must be at least 0.01, not 0"),
        ({"HEARTBEAT_SECONDS": 0}, "['HEARTBEAT_SECONDS'] must be a positive number or None"),
        ({"HEARTBEAT_SECONDS": float("nan")}, "['HEARTBEAT_SECONDS'] must be a positive number"),
        (
            {"LEASE_SECONDS": 3, "HEARTBEAT_SECONDS": 3},
            "['HEARTBEAT_SECONDS'] (3) must be shorter than LEASE_SECONDS (3.0)",
        ),
        (
            {"WORKER_HEARTBEAT_SECONDS": "10"},
            "['WORKER_HEARTBEAT_SECONDS'] must be a number, not str",
        ),
        (
            {"WORKER_HEARTBEAT_SECONDS": 0},
            "['WORKER_HEARTBEAT_SECONDS'] must be at least 0.05, not 0",
        ),
        (
            {"WORKER_HEARTBEAT_SECONDS": 3601},
            "['WORKER_HEARTBEAT_SECONDS'] must be at most 3600, not 3601",
        ),
        (
            {"WORKER_HEARTBEAT_SECONDS": float("inf")},
            "['WORKER_HEARTBEAT_SECONDS'] must be a finite number, not inf",
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
    assert config.READER_HEARTBEAT_SECONDS == 15.0
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
MYSQL = {"ENGINE": "django.db.backends.mysql", "NAME": "unused"}


def hide_modules(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    find_spec = importlib.util.find_spec

    def without(name: str, *args: Any) -> Any:
        return None if name in names else find_spec(name, *args)

    monkeypatch.setattr(postgresql.importlib.util, "find_spec", without)


@pytest.mark.parametrize(
    ("hidden", "found"), [(("psycopg",), "psycopg2"), (("psycopg", "psycopg2"), "no psycopg")]
)
def test_e006_postgresql_without_psycopg_3(
    monkeypatch: pytest.MonkeyPatch, hidden: tuple[str, ...], found: str
) -> None:
    # Django runs on psycopg2 too, but the worker's own statements need psycopg 3:
    # without it the first claim failed. An error, notifications on or off.
    if "psycopg2" not in hidden and importlib.util.find_spec("psycopg2") is None:
        pytest.skip("psycopg2 is not installed")
    hide_modules(monkeypatch, *hidden)
    for options in ({}, {"LISTEN_NOTIFY": False}):
        with (
            databases(pg=POSTGRES),
            override_settings(DURABLE_STREAMS={"DATABASE": "pg", **options}),
        ):
            messages = checks.check_settings()
        assert ids(messages) == ["durable_streams.E006"]
        assert messages[0].is_serious()
        assert "psycopg 3" in messages[0].msg
        assert f"{found} is installed" in messages[0].msg
        assert messages[0].hint == 'pip install "durable-streams[postgres]"'


def test_no_e006_with_psycopg_installed() -> None:
    # Runs where the postgres extra is installed (the PostgreSQL run).
    pytest.importorskip("psycopg")
    with databases(pg=POSTGRES), override_settings(DURABLE_STREAMS={"DATABASE": "pg"}):
        assert ids(checks.check_settings()) == []


@pytest.mark.parametrize(
    "engine", ["django.db.backends.oracle", "tests.no_such_backend", "django.db.backends.dummy"]
)
def test_e005_an_unsupported_database(engine: str) -> None:
    with (
        databases(other={"ENGINE": engine, "NAME": "unused"}),
        override_settings(DURABLE_STREAMS={"DATABASE": "other"}),
    ):
        messages = checks.check_settings()
        assert ids(messages) == ["durable_streams.E005"]
        assert f"uses {engine!r}, which durable_streams does not support" in messages[0].msg
        assert "MariaDB 10.6+" in messages[0].msg
        assert 'pip install "durable-streams[mysql]"' in messages[0].hint
        with pytest.raises(SystemCheckError, match=r"durable_streams\.E005"):
            call_command("check")


def test_e005_names_the_extra_of_a_missing_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver(engine: str) -> Any:
        raise ImproperlyConfigured("Error loading MySQLdb module.")

    monkeypatch.setattr(backends, "load_backend", no_driver)
    with databases(my=MYSQL), override_settings(DURABLE_STREAMS={"DATABASE": "my"}):
        messages = checks.check_settings()
    assert ids(messages) == ["durable_streams.E005"]
    assert "Error loading MySQLdb module." in messages[0].msg
    assert messages[0].hint == 'pip install "durable-streams[mysql]"'


def test_w003_mysql_outside_read_committed() -> None:
    pytest.importorskip("MySQLdb")
    for level, expected in [
        ("repeatable read", ["durable_streams.W003"]),
        ("read committed", []),
        (None, []),
    ]:
        mysql = {**MYSQL, "OPTIONS": {"isolation_level": level} if level else {}}
        with databases(my=mysql), override_settings(DURABLE_STREAMS={"DATABASE": "my"}):
            messages = checks.check_settings()
        assert ids(messages) == expected
        if expected:
            assert "REPEATABLE READ" in messages[0].msg
            assert "read committed" in messages[0].hint


class FakeMySQL:
    def __init__(self, version: tuple[int, ...], mariadb: bool) -> None:
        self.mysql_version = version
        self.mysql_is_mariadb = mariadb


@pytest.mark.parametrize(
    ("version", "mariadb", "expected"),
    [
        ((10, 5, 27), True, "MariaDB 10.5.27; durable_streams needs MariaDB 10.6 or later"),
        ((10, 6, 0), True, None),
        ((11, 4, 2), True, None),
        ((5, 7, 44), False, "MySQL 5.7.44; durable_streams needs MySQL 8.0.1 or later"),
        ((8, 0, 36), False, None),
    ],
)
def test_e007_a_mysql_server_without_skip_locked(
    monkeypatch: pytest.MonkeyPatch, version: tuple[int, ...], mariadb: bool, expected: str | None
) -> None:
    monkeypatch.setattr(
        MySQLBackend, "connection", property(lambda self: FakeMySQL(version, mariadb))
    )
    messages = MySQLBackend("default").check_server()
    if expected is None:
        assert messages == []
    else:
        assert ids(messages) == ["durable_streams.E007"]
        assert expected in messages[0].msg
        assert "SKIP LOCKED" in messages[0].msg


def test_the_server_check_runs_when_django_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tagged "database": migrate and check --database run it, plain check does not.
    seen: list[str] = []

    def check_server(self: Any) -> list[CheckMessage]:
        seen.append(self.using)
        return [Error("too old", id="durable_streams.E007")]

    backend = type(backends.backend_for("default"))
    monkeypatch.setattr(backend, "check_server", check_server)
    call_command("check")
    assert seen == []
    with pytest.raises(SystemCheckError, match=r"durable_streams\.E007"):
        call_command("check", databases=["default"])
    assert seen == ["default"]


def test_a_backend_per_alias_and_vendor() -> None:
    first = backends.backend_for("default")
    assert backends.backend_for("default") is first
    assert first.vendor == connection.vendor
    with databases(extra=dict(settings.DATABASES["default"])):
        # New settings, new backends.
        assert backends.backend_for("default") is not first


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
