"""Run one code block of the documentation as a reader would: ``python tests/docs_runner.py block.py``.

The block runs as the ``__main__`` module of a fresh interpreter (tests/test_docs.py starts one per
block, in a directory of its own, with ``$LOOPBRIDGE_DSN`` set). A block with ``await`` at its top level
runs as a notebook cell does: as one coroutine on an event loop that is running, so that its plain
(blocking) calls are made from inside a running loop too.

A block that defines a web application is then driven, as its reader would drive it: a Starlette or
FastAPI app through Starlette's ``TestClient`` (its lifespan entered, so its setup runs, and left), a
Flask app through its test client; every route that answers GET is requested once (path parameters
given the value 1) and must not answer with a server error (5xx). The output lists the requests.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any


def run(path: Path) -> dict[str, Any]:
    """Run the block in *path*; return its module namespace."""
    source = path.read_text()
    code = compile(source, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    # The block is the __main__ module, as a script is: what looks its own module up by name (SQLAlchemy
    # resolving a model's annotations, Django's ROOT_URLCONF = __name__, pickle) finds the block.
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    sys.modules["__main__"] = module
    namespace: dict[str, Any] = module.__dict__
    if code.co_flags & inspect.CO_COROUTINE:  # await at the top level: a notebook cell

        async def cell() -> None:
            await eval(code, namespace)

        asyncio.run(cell())
    else:
        exec(code, namespace)
    return namespace


def drive(namespace: dict[str, Any]) -> None:
    """Request every GET route of each web application the block defined."""
    for name, value in list(namespace.items()):
        if _is_instance(value, "starlette.applications", "Starlette"):
            _drive_starlette(name, value)
        elif _is_instance(value, "flask", "Flask"):
            _drive_flask(name, value)


def _is_instance(value: object, module: str, cls: str) -> bool:
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, cls))


def _concrete(path: str) -> str:
    """*path* with each parameter (``{user_id}``, ``<int:user_id>``) given the value 1."""
    return re.sub(r"\{[^}]+\}|<[^>]+>", "1", path)


def _drive_starlette(name: str, app: Any) -> None:
    from starlette.routing import Route
    from starlette.testclient import TestClient

    with TestClient(app) as client:  # the lifespan runs: startup now, shutdown at the end
        for route in app.routes:
            if isinstance(route, Route) and route.methods and "GET" in route.methods:
                path = _concrete(route.path)
                response = client.get(path)
                print(f"{name}: GET {path} -> {response.status_code}")
                assert response.status_code < 500, response.text


def _drive_flask(name: str, app: Any) -> None:
    client = app.test_client()
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static" and "GET" in (rule.methods or ()):
            path = _concrete(rule.rule)
            response = client.get(path)
            print(f"{name}: GET {path} -> {response.status_code}")
            assert response.status_code < 500, response.get_data(as_text=True)


def main() -> None:
    # The block's directory comes first on the path, as for any script, instead of tests/.
    sys.path[0] = str(Path.cwd())
    drive(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
