"""Argument conventions every `slm` command group shares."""

from __future__ import annotations

import argparse
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # the source tree slm runs from


def shipped_config(path: str) -> str:
    """A config path as given, or, when it does not exist from here but does in the source
    tree slm runs from, that file: `slm demo` and the other commands whose default is one of
    the repository's configs then work from any directory."""
    if not path or Path(path).exists() or not (CHECKOUT / path).is_file():
        return path
    return str(CHECKOUT / path)


def with_config_parser(sub: argparse.ArgumentParser, handler,
                       required: bool = True) -> argparse.ArgumentParser:
    sub.add_argument("--config", required=required,
                     help="YAML file, e.g. configs/tiny/synthetic.yaml" + ("" if required else
                                                                         " (default: built-in defaults)"))
    sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    sub.set_defaults(handler=handler)
    return sub
