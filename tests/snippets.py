"""The code blocks of the README and of the documentation pages, as a reader sees them.

Every fenced block whose info string is ``python`` (or ``py``) is collected, in README.md and in every
page under docs/, also when it is indented inside a list (its indentation is taken off). A block is a
*fragment* when the line right before its opening fence is ``<!-- fragment -->`` (other marker comments
may stand between the two): a piece of a larger program that cannot run on its own, which the tests
leave out. Every other block runs (tests/test_docs.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers import ROOT

__all__ = ["FRAGMENT", "Block", "blocks_in", "documented_blocks", "documents"]

#: The marker of a block that is not meant to run on its own.
FRAGMENT = "<!-- fragment -->"

_OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")
_COMMENT = re.compile(r"^[ \t]*<!--.*-->[ \t]*$")
_PYTHON = frozenset({"python", "py", "python3"})


@dataclass(frozen=True)
class Block:
    """One fenced Python block: where it is, its code, and whether it is a fragment."""

    path: Path
    line: int
    """The line of its opening fence (1-based)."""
    code: str
    fragment: bool

    @property
    def name(self) -> str:
        """``README.md:16``, ``docs/observability.md:40``."""
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path.as_posix()}:{self.line}"


def documents() -> list[Path]:
    """The files whose blocks are collected: the README, then the documentation pages in order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def documented_blocks() -> list[Block]:
    """Every Python block of every document."""
    return [block for path in documents() for block in blocks_in(path, path.read_text())]


def blocks_in(path: Path, text: str) -> Iterator[Block]:
    """The Python blocks of *text* (the contents of *path*), in order."""
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        opening = _OPENING.match(lines[number])
        if opening is None:
            number += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].split()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = number + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if info and info[0].lower() in _PYTHON:
            body = [_dedent(line, indent) for line in lines[number + 1 : end]]
            yield Block(path, number + 1, "\n".join(body) + "\n", _is_fragment(lines, number))
        number = end + 1


def _dedent(line: str, indent: str) -> str:
    return line[len(indent) :] if line.startswith(indent) else line.lstrip(" \t")


def _is_fragment(lines: list[str], fence: int) -> bool:
    """Whether the comment lines right before the fence at *fence* include the fragment marker."""
    before = fence - 1
    while before >= 0 and _COMMENT.match(lines[before]):
        if lines[before].strip() == FRAGMENT:
            return True
        before -= 1
    return False
