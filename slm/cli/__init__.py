"""`slm ...` subcommands: thin wrappers that parse arguments and call the library.

Each module here owns one group of commands and adds them with `add_commands`.
"""

from __future__ import annotations

import argparse
import sys

from slm.cli import bench, convert, data, measure, posttrain, run
from slm.errors import SlmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (run, posttrain, data, bench, measure, convert):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from slm.memory import keep_freed_memory

    keep_freed_memory()  # before JAX starts its threads
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SlmError as err:
        print(f"slm {args.command}: error: {err}", file=sys.stderr)
        return 2
