"""Settings: no ORM database, only ``LOOPBRIDGE`` (its DSN from ``$LOOPBRIDGE_DSN``): a Database and a
``loopbridge.sqlalchemy`` Engine."""

from __future__ import annotations

import os

SECRET_KEY = "loopbridge-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.apps.djangoproject.urls"
INSTALLED_APPS = ["loopbridge.contrib.django"]
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

LOOPBRIDGE = {
    "default": {"dsn": os.environ["LOOPBRIDGE_DSN"], "max_size": 4},
    "orm": {"dsn": os.environ["LOOPBRIDGE_DSN"], "kind": "engine", "pool_size": 4, "max_overflow": 0},
}
