"""Optional dependencies: a module that needs one says which extra installs it.

``loopbridge.sqlalchemy`` and the framework helpers in ``loopbridge.contrib`` each need a package that
loopbridge itself does not depend on. Imported without it, they raise ``ModuleNotFoundError`` saying what
to install (the original error chained), rather than a bare "No module named 'sqlalchemy'" from deep
inside the module.
"""

from __future__ import annotations

import importlib

__all__ = ["require"]


def require(user: str, extra: str, *modules: str, also: str = "") -> None:
    """Import *modules* (for *user*, a module of loopbridge), or raise what says to install *extra*.

    :raises ModuleNotFoundError: naming the missing module and ``pip install 'loopbridge[extra]'``.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing = exc.name or module
            raise ModuleNotFoundError(
                f"{user} needs {missing!r}, which is not installed: pip install 'loopbridge[{extra}]'{also}",
                name=exc.name,
            ) from exc
