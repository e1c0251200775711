"""Django settings for the durable_streams side of the benchmarks.

``BENCH_DS_DB`` picks the database: ``pg`` (the ``ds_bench`` database on the local
PostgreSQL server, ``BENCH_PG_URL``) or ``sqlite`` (the file ``BENCH_SQLITE_PATH``).
"""

from __future__ import annotations

import os

SECRET_KEY = "durable-streams-bench"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "bench.urls"
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
    "bench",
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

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
DS_DB_NAME = os.environ.get("BENCH_DS_DB_NAME", "ds_bench")
BACKEND = os.environ.get("BENCH_DS_DB", "pg")

if BACKEND == "pg":
    from urllib.parse import urlsplit

    _url = urlsplit(PG_URL)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": DS_DB_NAME,
            "USER": _url.username or "postgres",
            "PASSWORD": _url.password or "",
            "HOST": _url.hostname or "127.0.0.1",
            "PORT": str(_url.port or 5432),
        }
    }
    # The ASGI server of items 3 and 4 keeps its connections, as a deployment would.
    DATABASES["default"]["CONN_MAX_AGE"] = float(os.environ.get("BENCH_CONN_MAX_AGE", "0"))
elif BACKEND == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("BENCH_SQLITE_PATH", "/tmp/ds_bench.sqlite3"),
        }
    }
else:
    raise RuntimeError(f"BENCH_DS_DB must be 'pg' or 'sqlite', not {BACKEND!r}.")

DURABLE_STREAMS: dict[str, object] = {
    # Processes sharing a SQLite file learn of new values by polling: 10 ms here
    # (the default is 100 ms). PostgreSQL wakes readers with LISTEN/NOTIFY.
    "POLL_INTERVAL": float(os.environ.get("BENCH_POLL_INTERVAL", "0.01")),
}

ASGI_APPLICATION = "bench.asgi.application"
# Items 3 and 4 push values to WebSocket clients through Redis (a database number of
# its own and a prefix, so other users of the server are not disturbed).
if os.environ.get("BENCH_REDIS_URL"):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py refuses a 101st concurrent command by default; a burst of
                # 1,000 sockets connecting needs more. Its socket timeout (5 s
                # by default in redis-py 8) must exceed channels-redis' 5 s blocking
                # pop, or every idle receive fails with a TimeoutError.
                "hosts": [
                    {
                        "address": os.environ["BENCH_REDIS_URL"],
                        "max_connections": 2000,
                        "socket_timeout": 10,
                    }
                ],
                "prefix": "ds-bench",
            },
        }
    }

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"durable_streams": {"handlers": ["console"], "level": "WARNING"}},
}

if os.environ.get("BENCH_LEASE_SECONDS"):
    # Quick runs only: the full run measures recovery with the default lease.
    DURABLE_STREAMS["LEASE_SECONDS"] = float(os.environ["BENCH_LEASE_SECONDS"])
