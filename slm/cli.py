"""`slm ...` subcommands: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import sys

from slm.errors import SlmError


def _train(args: argparse.Namespace) -> int:
    from slm.config import load_config
    from slm.train.trainer import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    if result.history:
        last = result.history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}")
    else:
        print(f"{config.checkpoint.dir} is already at step {config.train.steps}; nothing to train "
              "(raise train.steps to continue)")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    import yaml

    from slm.config import config_to_dict, load_config

    print(yaml.safe_dump(config_to_dict(load_config(args.config, args.overrides)), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", required=True, help="YAML file, e.g. configs/tiny/synthetic.yaml")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
        sub.set_defaults(handler=handler)
        return sub

    with_config("train", "train a model (resumes from checkpoint.dir if it holds one)", _train)
    with_config("config", "print the fully resolved config", _show_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SlmError as err:
        print(f"slm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
