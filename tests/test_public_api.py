"""The public surface: what __all__ promises exists, and the errors form the documented hierarchy."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import loopbridge
from loopbridge import errors
from tests.support import run_script


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
