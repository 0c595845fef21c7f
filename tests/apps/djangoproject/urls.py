from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("sync", views.sync_view),
    path("async", views.async_view),
]
