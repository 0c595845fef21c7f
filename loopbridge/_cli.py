"""The ``loopbridge`` command (also ``python -m loopbridge``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loopbridge",
        description="One daemon thread owns the event loop and every PostgreSQL pool.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="use one Database from sync threads, two asyncio.run() loops and a running loop, and verify",
        description="Show one Database serving sync threads, an asyncio.run() CLI wizard, a second "
        "fresh loop and a running loop's sync call at once; verify every row; print a report.",
    )
    demo.add_argument(
        "--dsn",
        help="postgresql://user:password@host:5432/dbname (default: $LOOPBRIDGE_DSN, else an embedded "
        "PostgreSQL from the loopbridge[embedded] extra)",
    )
    demo.add_argument("--threads", type=int, default=8, help="sync threads and tasks per loop (default 8)")
    demo.add_argument("--calls", type=int, default=50, help="inserts per thread or task (default 50)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from ._demo import run_demo

    return run_demo(args.dsn, threads=args.threads, calls=args.calls)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
