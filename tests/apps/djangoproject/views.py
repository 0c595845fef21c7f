"""A sync and an async view on the Database, and the same on the Engine: each inserts a row and says where
it ran."""

from __future__ import annotations

import asyncio
import threading

from django.http import HttpRequest, JsonResponse
from sqlalchemy import text

from loopbridge.contrib.django import databases, engines

INSERT = text("INSERT INTO hits (kind) VALUES (:kind) RETURNING id")


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


def sync_view(request: HttpRequest) -> JsonResponse:
    db = databases["default"]
    new_id = db.fetchval("INSERT INTO hits (kind) VALUES ('sync') RETURNING id")
    return JsonResponse({"id": new_id, "thread": threading.current_thread().name, "loop": _loop_name()})


async def async_view(request: HttpRequest) -> JsonResponse:
    db = databases["default"]
    new_id = await db.afetchval("INSERT INTO hits (kind) VALUES ('async') RETURNING id")
    return JsonResponse(
        {
            "id": new_id,
            "thread": threading.current_thread().name,
            "loop": _loop_name(),
            "bridge_loop_is_this_loop": db.bridge.loop is asyncio.get_running_loop(),
        }
    )


def engine_sync_view(request: HttpRequest) -> JsonResponse:
    with engines["orm"].session() as session:
        new_id = session.scalar(INSERT, {"kind": "engine-sync"})
    return JsonResponse({"id": new_id, "thread": threading.current_thread().name, "loop": _loop_name()})


async def engine_async_view(request: HttpRequest) -> JsonResponse:
    engine = engines["orm"]
    async with engine.session() as session:
        new_id = await session.scalar(INSERT, {"kind": "engine-async"})
    return JsonResponse(
        {
            "id": new_id,
            "thread": threading.current_thread().name,
            "loop": _loop_name(),
            "bridge_loop_is_this_loop": engine.bridge.loop is asyncio.get_running_loop(),
        }
    )


def _loop_name() -> str | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return f"{type(loop).__module__}.{type(loop).__qualname__}"
