"""The README's code, as written: the fenced block that follows a marker comment.

A block meant to run is marked in README.md by a comment on the line before it (``<!-- name -->``); the
tests read it from there, so that what a reader copies is what was tested.
"""

from __future__ import annotations

import re

from tests.servers import ROOT

README = ROOT / "README.md"


def fenced_block(marker: str) -> str:
    """The code of the fenced block right after ``<!-- marker -->`` in README.md (fences left out).

    :raises LookupError: if the README has no such marker, or no fenced block right after it.
    """
    text = README.read_text()
    pattern = rf"^<!-- {re.escape(marker)} -->\n```[\w-]*\n(.*?)^```$"
    found = re.search(pattern, text, re.MULTILINE | re.DOTALL)
    if found is None:
        raise LookupError(f"README.md has no fenced block right after <!-- {marker} -->")
    return found[1]
