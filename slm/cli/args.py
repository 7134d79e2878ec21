"""Argument conventions every `slm` command group shares."""

from __future__ import annotations

import argparse


def with_config_parser(sub: argparse.ArgumentParser, handler,
                       required: bool = True) -> argparse.ArgumentParser:
    sub.add_argument("--config", required=required,
                     help="YAML file, e.g. configs/tiny/synthetic.yaml" + ("" if required else
                                                                         " (default: built-in defaults)"))
    sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    sub.set_defaults(handler=handler)
    return sub
