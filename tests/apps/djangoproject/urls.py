from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("sync", views.sync_view),
    path("async", views.async_view),
    path("engine-sync", views.engine_sync_view),
    path("engine-async", views.engine_async_view),
]
