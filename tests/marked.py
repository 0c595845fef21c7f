"""A documented block, as written: the fenced block that follows a marker comment.

A block that a test runs in a way of its own (the FastAPI guide's quickstart, under uvicorn) is marked in
its page by a comment on the line before it (``<!-- name -->``); the test reads it from there, so that
what a reader copies is what was tested. The marker may be in README.md or in any page under docs/, and
must be in exactly one of them.
"""

from __future__ import annotations

import re

from tests.servers import ROOT
from tests.snippets import documents


def fenced_block(marker: str) -> str:
    """The code of the fenced block right after ``<!-- marker -->`` (fences left out).

    :raises LookupError: if no document, or more than one, has such a marker with a fenced block right
        after it.
    """
    pattern = re.compile(rf"^<!-- {re.escape(marker)} -->\n```[\w-]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    found = [(path, match[1]) for path in documents() for match in pattern.finditer(path.read_text())]
    if len(found) != 1:
        where = ", ".join(str(path.relative_to(ROOT)) for path, _ in found) or "no document"
        raise LookupError(f"<!-- {marker} --> followed by a fenced block must be in one document: {where}")
    return found[0][1]
