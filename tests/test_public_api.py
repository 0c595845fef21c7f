"""The public surface: what __all__ promises exists, and the errors form the documented hierarchy."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import loopbridge
from loopbridge import errors
from tests.support import run_loop, run_script


def test_every_name_in_all_exists() -> None:
    for name in loopbridge.__all__:
        assert hasattr(loopbridge, name), name


def test_every_public_class_and_function_is_exported() -> None:
    public = {
        name
        for name, value in vars(loopbridge).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert public <= set(loopbridge.__all__)


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.BridgeClosedError, RuntimeError),
        (errors.DatabaseClosedError, RuntimeError),
        (errors.DeadlockError, RuntimeError),
        (errors.CallTimeoutError, TimeoutError),
        (errors.PoolTimeoutError, TimeoutError),
        (errors.ConnectError, ConnectionError),
        (errors.ConnectionLostError, ConnectionError),
        (errors.ConfigurationError, ValueError),
        (errors.TransactionClosedError, RuntimeError),
        (errors.TransactionTimeoutError, TimeoutError),
        (errors.TransactionTimeoutError, RuntimeError),
        (errors.SubscriptionClosedError, RuntimeError),
    ],
)
def test_each_error_is_a_loopbridge_error_and_a_builtin(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, errors.LoopBridgeError)
    assert issubclass(error, builtin)
    assert error.__doc__
    assert error.__name__ in errors.__all__


def test_pool_timeout_is_a_call_timeout() -> None:
    assert issubclass(errors.PoolTimeoutError, errors.CallTimeoutError)


def test_a_transaction_timeout_is_both_a_closed_transaction_and_a_call_timeout() -> None:
    assert issubclass(errors.TransactionTimeoutError, errors.TransactionClosedError)
    assert issubclass(errors.TransactionTimeoutError, errors.CallTimeoutError)


def test_the_package_is_typed() -> None:
    assert Path(inspect.getfile(loopbridge)).with_name("py.typed").exists()


CONTRIB = [
    "loopbridge.contrib.starlette",
    "loopbridge.contrib.fastapi",
    "loopbridge.contrib.django",
    "loopbridge.contrib.django.apps",
    "loopbridge.contrib.flask",
    "loopbridge.contrib.pytest_plugin",
]


@pytest.mark.parametrize("name", CONTRIB)
def test_every_name_in_each_contrib_module_exists(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__
    for exported in module.__all__:
        assert hasattr(module, exported), f"{name}.{exported}"


def test_importing_loopbridge_imports_no_framework() -> None:
    # The integrations are optional: a plain install has none of these, so nothing may need them.
    out = run_script(
        """
        import sys
        import loopbridge, loopbridge.contrib
        print(sorted(m for m in ("fastapi", "starlette", "django", "flask") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def _public_classes() -> list[type]:
    return [value for name in loopbridge.__all__ if inspect.isclass(value := getattr(loopbridge, name))]


def test_every_a_named_method_of_the_public_api_is_a_coroutine_function() -> None:
    # The twin convention: "a" + the name of a method that exists is its async twin, awaited. A
    # factory named that way (a transaction, a stream, a subscription for async code) would read as one.
    checked = 0
    for cls in _public_classes():
        for name in dir(cls):
            if name.startswith("a") and hasattr(cls, name[1:]) and callable(getattr(cls, name)):
                assert inspect.iscoroutinefunction(getattr(cls, name)), f"{cls.__name__}.{name}"
                checked += 1
    assert checked > 20


@pytest.mark.parametrize(
    ("make", "right_form"),
    [
        (lambda db: db.transaction(), "async with db.transaction() as tx:"),
        (lambda db: db.iterate("SELECT 1"), "async for row in db.iterate(...):"),
        (lambda db: db.listen("events"), "async with db.listen(...) as sub:"),
    ],
    ids=["transaction", "iterate", "listen"],
)
def test_awaiting_an_object_used_in_a_block_names_the_right_form(
    make: Any, right_form: str, admin_dsn: str
) -> None:
    db = loopbridge.Database(admin_dsn)
    try:

        async def misuse() -> None:
            await make(db)

        with pytest.raises(TypeError, match=re.escape(right_form)):
            run_loop(misuse)
        assert db.stats().size == 0  # refused before anything ran: the pool was not even opened
    finally:
        db.close()


def test_importing_loopbridge_changes_nothing_in_the_process() -> None:
    # No exit hook, collector callback, fork hook, thread or signal handler until the first bridge
    # starts; then the three hooks, once.
    out = run_script(
        """
        import atexit, gc, os, signal, sys, threading

        registered = []  # by loopbridge's own modules (the standard library registers its own)

        def note(kind):
            if sys._getframe(2).f_globals.get("__name__", "").startswith("loopbridge"):
                registered.append(kind)

        real_atexit, real_fork = atexit.register, os.register_at_fork
        atexit.register = lambda *a, **k: note("atexit") or real_atexit(*a, **k)
        os.register_at_fork = lambda **k: note("fork") or real_fork(**k)
        callbacks, threads = len(gc.callbacks), threading.active_count()
        handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

        import loopbridge, loopbridge.database, loopbridge.transaction, loopbridge.listen
        import loopbridge.contrib, loopbridge.contrib.pytest_plugin
        db = loopbridge.Database("postgresql://nobody@127.0.0.1:1/none")
        print(registered, len(gc.callbacks) - callbacks, threading.active_count() - threads,
              {n: signal.getsignal(n) for n in handlers} == handlers)

        bridge = loopbridge.Bridge("first")
        bridge.run(lambda: __import__("asyncio").sleep(0))
        loopbridge.Bridge("second").run(lambda: __import__("asyncio").sleep(0))
        print(sorted(registered), len(gc.callbacks) - callbacks)
        """
    )
    before, after = out.strip().splitlines()
    assert before == "[] 0 0 True"
    assert after == "['atexit', 'fork', 'fork'] 1"  # the bridge's exit and fork hooks, the waiters' fork hook
