"""The ``llgbm`` command. Each subcommand lives in its own module with ``register(subparsers)``.

Bad input ends with one line on stderr naming the file or argument and exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LLGBMError
from . import criterion_weights, data, deltas, demo, dnd, eval, generate, model, tokens, train

SUBCOMMANDS = (criterion_weights, data, deltas, demo, dnd, eval, generate, model, tokens, train)


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
        print(f"llgbm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llgbm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
