"""The Django app config: builds ``loopbridge.contrib.django.databases`` (and ``engines``) when Django
starts, and closes what follows a ``DATABASES`` alias before Django creates or drops a test database."""

from __future__ import annotations

import atexit

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.signals import connection_created

from loopbridge.bridge import install_process_hooks

from . import _EXAMPLE, _before_test_databases, databases

__all__ = ["LoopBridgeConfig"]


class LoopBridgeConfig(AppConfig):
    name = "loopbridge.contrib.django"
    label = "loopbridge"
    verbose_name = "loopbridge"

    def ready(self) -> None:
        if not hasattr(settings, "LOOPBRIDGE"):
            raise ImproperlyConfigured(
                "'loopbridge.contrib.django' is in INSTALLED_APPS but settings has no LOOPBRIDGE: "
                f"add {_EXAMPLE}"
            )
        databases.configure(settings.LOOPBRIDGE)
        # Both test runners create, clone and drop test databases over a connection to no database in
        # particular: what follows an alias must be closed first (see _before_test_databases).
        connection_created.connect(_before_test_databases, dispatch_uid="loopbridge.test-databases")
        # Django has no shutdown signal; the process's exit is the end of every request. Registered
        # after loopbridge's own exit handler (installed now if no bridge has started yet), so it runs
        # first: the pools close while the bridge runs.
        install_process_hooks()
        atexit.unregister(databases.close_all)  # once, however often Django is set up
        atexit.register(databases.close_all)
