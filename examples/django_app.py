"""Django on loopbridge, in one file: a sync and an async view on the same Database, ASGI or WSGI.

Run, from the repository root, under ASGI or under WSGI:

    LOOPBRIDGE_DSN=postgresql://postgres@localhost/postgres uvicorn --app-dir examples django_app:app
    LOOPBRIDGE_DSN=postgresql://postgres@localhost/postgres gunicorn --chdir examples django_app:wsgi

Then ``curl localhost:8000/visit`` and ``curl localhost:8000/avisit``.
"""

from __future__ import annotations

from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="example-only",
    INSTALLED_APPS=["loopbridge.contrib.django"],
    LOOPBRIDGE={"default": {"max_size": 4}},  # the DSN from $LOOPBRIDGE_DSN
)

import django  # noqa: E402  (settings first: this is a one-file project)

django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from loopbridge.contrib.django import databases  # noqa: E402

db = databases["default"]
db.execute("CREATE TABLE IF NOT EXISTS example_django_visits (id serial PRIMARY KEY, kind text NOT NULL)")


def visit(request: HttpRequest) -> JsonResponse:
    """A sync view: a WSGI thread, or Django's thread-sensitive executor under ASGI."""
    db.execute("INSERT INTO example_django_visits (kind) VALUES ('sync')")
    return JsonResponse({"visits": db.fetchval("SELECT count(*) FROM example_django_visits")})


async def avisit(request: HttpRequest) -> JsonResponse:
    """An async view: the server's loop under ASGI, a loop of its own per request under WSGI."""
    await db.aexecute("INSERT INTO example_django_visits (kind) VALUES ('async')")
    return JsonResponse({"visits": await db.afetchval("SELECT count(*) FROM example_django_visits")})


urlpatterns = [path("visit", visit), path("avisit", avisit)]

app = get_asgi_application()
wsgi = get_wsgi_application()
