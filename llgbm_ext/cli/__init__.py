"""The ``llgbm`` command. Each subcommand lives in its own module with ``register(subparsers)``.

Bad input ends with one line on stderr naming the file or argument and exit status 2; a failed
read or write of the system (disk full, permission denied ...) with one line naming the file and
exit status 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LLGBMError
from . import (ablate, analogy, criterion_weights, data, deltas, demo, dnd, eval, generate, model, teachers, tokens,
               train)

SUBCOMMANDS = (ablate, analogy, criterion_weights, data, deltas, demo, dnd, eval, generate, model, teachers, tokens,
               train)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="llgbm", parents=[common],
        description="Behavioral supervision for prompt-to-LoRA generators (a Drag-and-Drop LLMs plugin).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LLGBMError as e:
        if args.debug:
            raise
        sys.stderr.write(f"llgbm {args.command}: error: {_one_line(str(e))}\n")  # one write: ranks share stderr
        sys.stderr.flush()
        from ..signals.base import settle

        settle(e)
        return 2
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"llgbm {args.command}: error: {where}{_one_line(e.strerror or str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llgbm {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    """The first line of a message (some library errors carry a second, explanatory paragraph)."""
    return next((line.strip() for line in message.splitlines() if line.strip()), message)


if __name__ == "__main__":
    sys.exit(main())
