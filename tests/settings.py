"""Settings for the test suite: SQLite by default, PostgreSQL when DATABASE_URL is set."""

import os
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = "durable-streams-tests"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "durable_streams",
    "tests",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

STATIC_URL = "/static/"

# Worker processes started by the tests must open the very database the test
# run created: the run publishes its name in DS_TEST_DB_NAME for them.
_db_name_override = os.environ.get("DS_TEST_DB_NAME")

DATABASE_URL = os.environ.get("DATABASE_URL")
if DATABASE_URL:
    import dj_database_url

    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
        # Case-sensitive text, as on the other databases: stream keys "a" and "A" differ.
        DATABASES["default"]["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_bin"}
else:
    # A file, not memory: worker threads and worker processes share it.
    _sqlite_dir = os.environ.setdefault("DS_TEST_SQLITE_DIR", tempfile.mkdtemp(prefix="ds-tests-"))
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(Path(_sqlite_dir) / "db.sqlite3"),
            "TEST": {"NAME": str(Path(_sqlite_dir) / "test.sqlite3")},
        }
    }
if _db_name_override:
    DATABASES["default"]["NAME"] = _db_name_override

REDIS_URL = os.environ.get("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # Longer than channels-redis' 5 s blocking pop (redis-py 8 defaults to 5 s).
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 10}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

ASGI_APPLICATION = "tests.asgi.application"

DURABLE_STREAMS = {
    "LEASE_SECONDS": float(os.environ.get("DS_LEASE_SECONDS", "3")),
    "POLL_INTERVAL": float(os.environ.get("DS_POLL_INTERVAL", "0.02")),
    "SHUTDOWN_GRACE_SECONDS": float(os.environ.get("DS_GRACE_SECONDS", "10")),
    "WORKER_HEARTBEAT_SECONDS": float(os.environ.get("DS_WORKER_HEARTBEAT_SECONDS", "10")),
    # Waits block in place unless a test asks for suspension (the default is 1 s).
    "SUSPEND_AFTER_SECONDS": float(os.environ.get("DS_SUSPEND_AFTER_SECONDS", "60")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"durable_streams": {"handlers": ["console"], "level": "WARNING"}},
}
