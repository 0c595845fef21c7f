"""A Django project in one module: minimal settings, and one sync view per side of pair django, served
by gunicorn's threaded worker (``gunicorn -k gthread --threads 16 -w 1``), one process per side.

* ``/lb/items/<id>``: loopbridge through ``loopbridge.contrib.django`` (``databases["default"]``);
* ``/django/items/<id>``: Django's own connection (``django.db.connection.cursor()``), ENGINE
  ``django.db.backends.postgresql`` on psycopg 3, persistent (``CONN_MAX_AGE=None``): each of the 16
  worker threads keeps one connection for the whole run, as a pool of 16 would.

Each side only touches its own: Django opens its connection on first use and loopbridge its pool on
first use, so the other side's stays closed in each process.

    gunicorn -k gthread --threads 16 -w 1 benchmarks.apps.django_app:application
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.db import connection
from django.http import Http404, HttpRequest, JsonResponse
from django.urls import path
from psycopg.conninfo import conninfo_to_dict

from loopbridge.contrib.django import databases

from ._common import POOL_SIZE, dsn, query

LB_QUERY = query("$1")
DJANGO_QUERY = query("%s")


def _django_database() -> dict[str, Any]:
    """Django's DATABASES entry for the runner's DSN: its parts in Django's keys, the rest as options."""
    params = conninfo_to_dict(dsn())
    entry: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.pop("dbname", None) or params.get("user") or "postgres",
        "USER": params.pop("user", None) or "",
        "PASSWORD": params.pop("password", None) or "",
        "HOST": params.pop("host", None) or "",
        "PORT": str(params.pop("port", None) or ""),
        # None: never closed between requests. Django's default (0) would connect once per request.
        "CONN_MAX_AGE": None,
        "OPTIONS": params,
    }
    return entry


settings.configure(
    DEBUG=False,  # DEBUG would keep every query in connection.queries
    SECRET_KEY="loopbridge-benchmark-only",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["loopbridge.contrib.django"],
    MIDDLEWARE=[],
    USE_TZ=True,
    DATABASES={"default": _django_database()},
    LOOPBRIDGE={"default": {"dsn": dsn(), "min_size": POOL_SIZE, "max_size": POOL_SIZE}},
    # A view's exception on stderr, which the runner shows: without DEBUG, Django only mails it to ADMINS.
    LOGGING={
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"class": "logging.StreamHandler"}},
        "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR"}},
    },
)


def lb_item(request: HttpRequest, item_id: int) -> JsonResponse:
    row = databases["default"].fetchrow(LB_QUERY, item_id)
    if row is None:
        raise Http404
    return JsonResponse({"id": row["id"], "name": row["name"]})


def django_item(request: HttpRequest, item_id: int) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute(DJANGO_QUERY, [item_id])
        row = cursor.fetchone()
    if row is None:
        raise Http404
    return JsonResponse({"id": row[0], "name": row[1]})


urlpatterns = [
    path("lb/items/<int:item_id>", lb_item),
    path("django/items/<int:item_id>", django_item),
]

application = get_wsgi_application()
