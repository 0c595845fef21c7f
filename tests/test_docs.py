"""The documentation: every code block runs, and the API reference covers every public name.

Each Python block of README.md and of docs/ (tests/snippets.py finds them; ``<!-- fragment -->`` on the
line before a fence leaves that block out) runs in a fresh interpreter (tests/docs_runner.py), in a
directory of its own, against the test server: ``$LOOPBRIDGE_DSN`` names a schema of the block's own
(``search_path``) holding the tables the examples query (:data:`TABLES`), and every DSN written in the
block as a string literal (``"postgresql://app@db:5432/app"``) is replaced by that one. A block that
fails, writes a traceback or outlives :data:`BLOCK_TIMEOUT` fails its test.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ROOT
from tests.snippets import FRAGMENT, Block, blocks_in, documented_blocks
from tests.support import independent

#: What the examples' queries expect to find: created in each block's schema before it runs.
TABLES = (
    "CREATE TABLE users (id serial PRIMARY KEY, name text, visits integer NOT NULL DEFAULT 0)",
    "CREATE TABLE events (id serial PRIMARY KEY, day date NOT NULL DEFAULT current_date, kind text, "
    "payload jsonb)",
)

#: Seconds a block may run (it starts an interpreter, a bridge and a pool, and may drive an app).
BLOCK_TIMEOUT = 120

#: A DSN written as a string literal in a block.
DSN_LITERAL = re.compile(
    r"""(?P<quote>["'])(?:postgres|postgresql|postgresql\+asyncpg)://[^"'\s]*(?P=quote)"""
)

BLOCKS = documented_blocks()
RUNNABLE = [pytest.param(block, id=block.name) for block in BLOCKS if not block.fragment]


def with_dsn(code: str, dsn: str) -> str:
    """*code* with every DSN literal replaced by *dsn*."""
    return DSN_LITERAL.sub(lambda match: f"{match['quote']}{dsn}{match['quote']}", code)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE)
def test_the_block_runs_as_written(block: Block, dsn: str, tmp_path: Path) -> None:
    for table in TABLES:
        independent(dsn, table)
    script = tmp_path / "block.py"
    script.write_text(with_dsn(block.code, dsn))
    unwanted = ("DATABASE_URL", "PYTEST_ADDOPTS")
    env = {name: value for name, value in os.environ.items() if name not in unwanted}
    env["LOOPBRIDGE_DSN"] = dsn
    try:
        run = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "docs_runner.py"), str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.name}: still running after {BLOCK_TIMEOUT} s")
    shown = f"{block.name} (mark it {FRAGMENT} if it cannot run on its own)\n{run.stdout}\n{run.stderr}"
    assert run.returncode == 0, shown
    assert "Traceback" not in run.stderr, shown


class TestCollector:
    """What counts as a block, and what as a fragment."""

    def test_python_blocks_are_found_with_their_line_and_code(self) -> None:
        text = "# Title\n\n```python\nx = 1\n```\n\n```bash\necho no\n```\n\n~~~py\ny = 2\n~~~\n"
        found = list(blocks_in(ROOT / "page.md", text))
        assert [(block.line, block.code, block.fragment) for block in found] == [
            (3, "x = 1\n", False),
            (11, "y = 2\n", False),
        ]
        assert found[0].name == "page.md:3"

    def test_a_block_indented_in_a_list_loses_its_indentation(self) -> None:
        text = "- item:\n\n  ```python\n  with db:\n      pass\n  ```\n"
        (block,) = blocks_in(ROOT / "page.md", text)
        assert block.code == "with db:\n    pass\n"

    def test_the_fragment_marker_on_the_line_before_the_fence(self) -> None:
        text = (
            f"{FRAGMENT}\n```python\na()\n```\n"
            f"  {FRAGMENT}\n  <!-- other-marker -->\n  ```python\nb()\n  ```\n"
            f"{FRAGMENT}\n\n```python\nc()\n```\n"
        )
        assert [block.fragment for block in blocks_in(ROOT / "page.md", text)] == [True, True, False]

    def test_a_fence_inside_another_block_is_not_a_block(self) -> None:
        text = "````markdown\n```python\nnot_run()\n```\n````\n"
        assert list(blocks_in(ROOT / "page.md", text)) == []

    def test_the_readme_and_the_pages_have_blocks_to_run(self) -> None:
        names = {block.name.partition(":")[0] for block in BLOCKS if not block.fragment}
        assert {"README.md", "docs/observability.md"} <= names

    def test_dsn_literals_are_replaced_and_nothing_else(self) -> None:
        code = "Database('postgresql://app@db/app')\nEngine(\"postgresql+asyncpg://a:b@h:1/d?x=1\")\nurl = 'https://x'\n"
        assert with_dsn(code, "postgresql://t@127.0.0.1/t") == (
            "Database('postgresql://t@127.0.0.1/t')\nEngine(\"postgresql://t@127.0.0.1/t\")\nurl = 'https://x'\n"
        )


#: The modules whose ``__all__`` the API reference documents, name by name.
PUBLIC_MODULES = [
    "loopbridge",
    "loopbridge.sqlalchemy",
    "loopbridge.contrib.starlette",
    "loopbridge.contrib.fastapi",
    "loopbridge.contrib.django",
    "loopbridge.contrib.django.apps",
    "loopbridge.contrib.flask",
    "loopbridge.contrib.pytest_plugin",
]

REFERENCE = ROOT / "docs" / "reference"


def rendered_identifiers() -> set[str]:
    return {
        identifier
        for page in REFERENCE.glob("*.md")
        for identifier in re.findall(r"^::: (\S+)$", page.read_text(), re.MULTILINE)
    }


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_the_api_reference_has_an_entry_for_every_public_name(module: str) -> None:
    missing = {
        f"{module}.{name}" for name in importlib.import_module(module).__all__
    } - rendered_identifiers()
    assert not missing, f"add '::: <name>' lines to a page of docs/reference/ for: {sorted(missing)}"


def test_every_public_contrib_module_is_in_the_reference() -> None:
    contrib = ROOT / "loopbridge" / "contrib"
    public = set()
    for path in contrib.rglob("*.py"):
        parts = path.relative_to(contrib).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts and not any(part.startswith("_") for part in parts) and "__all__" in path.read_text():
            public.add(".".join(("loopbridge", "contrib", *parts)))
    assert public <= set(PUBLIC_MODULES)


def load_twins_extension() -> Any:
    spec = importlib.util.spec_from_file_location("griffe_twins", ROOT / "docs" / "_ext" / "griffe_twins.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Twins


@pytest.fixture(scope="module")
def package() -> Any:
    """loopbridge as the API reference reads it: griffe, with the twins extension."""
    import griffe

    extensions = griffe.load_extensions(load_twins_extension())
    loader = griffe.GriffeLoader(extensions=extensions, docstring_parser="sphinx")
    return loader.load("loopbridge")


class TestTwinsInTheReference:
    """The twins are made at run time; the griffe extension gives the reference their signatures."""

    def test_fetch_has_the_implementations_signature_and_the_twins_docstring(self, package: Any) -> None:
        for name, is_async in (("fetch", False), ("afetch", True)):
            method = package["database.Database"].members[name]
            assert method.is_function
            signature = [(parameter.name, parameter.kind.value) for parameter in method.parameters]
            assert signature == [
                ("self", "positional or keyword"),
                ("query", "positional or keyword"),
                ("args", "variadic positional"),
                ("timeout", "keyword-only"),
            ]
            assert method.parameters["timeout"].default == "None"
            assert str(method.returns) == "list[asyncpg.Record]"
            assert method.docstring.value.startswith("Run *query* with *args*")
            assert ("async" in method.labels) is is_async
            assert ("Blocking: runs on the bridge loop" in method.docstring.value) is not is_async

    def test_every_twin_of_every_public_class_becomes_a_method(self, package: Any) -> None:
        for path, names in {
            "database.Database": ("execute", "aexecute", "run", "arun", "open", "aopen"),
            "transaction.Transaction": ("fetchrow", "afetchrow", "executemany", "aexecutemany"),
            "sqlalchemy.engine.Engine": ("run_sync", "arun_sync"),
            "sqlalchemy.session.BridgedSession": ("execute", "scalars", "commit"),
            "sqlalchemy.session.AsyncBridgedSession": ("execute", "scalars", "commit"),
        }.items():
            for name in names:
                member = package[path].members[name]
                assert member.is_function, f"{path}.{name}"
                assert member.docstring is not None, f"{path}.{name}"

    def test_sphinx_roles_become_links_or_code(self, package: Any) -> None:
        docstring = package["database.Database"].members["transaction"].docstring.value
        assert "[`Transaction`][loopbridge.Transaction]" in docstring
        assert ":class:" not in docstring
