"""`slm posttrain <method>|compare`: post-train a checkpoint on its own spoken replies with
any registered method, or compare the methods from one SFT checkpoint."""

from __future__ import annotations

import argparse

from slm.cli.args import with_config_parser


def _posttrain(args: argparse.Namespace) -> int:
    from slm.config import load_config
    from slm.parallel.distributed import initialize_from_env

    config = load_config(args.config, args.overrides)
    initialize_from_env()  # before anything starts a JAX backend
    from slm.posttrain.trainer import posttrain

    result = posttrain(config, args.method)
    if result.history:
        last = result.history[-1]
        shown = "".join(f" {k} {last[k]:.4f}" for k in ("reward", "accuracy", "kl") if k in last)
        print(f"step {last['step']}: loss {last['loss']:.4f}{shown}")
    else:
        print(f"{config.checkpoint.dir} is already at step {config.train.steps}; nothing to train "
              "(raise train.steps to continue)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slm.posttrain.compare import CompareSettings, compare_posttraining

    settings = CompareSettings(runs=tuple(args.runs.split(",")), steps=args.steps,
                               questions=args.questions,
                               conditions=tuple(args.conditions.split(",")),
                               batch_size=args.batch_size,
                               max_reply_steps=args.max_reply_steps, ngram=args.ngram,
                               rollout_rounds=args.rollout_rounds)
    compare_posttraining(args.checkpoint, args.corpus, args.out, settings, args.overrides,
                         args.judge or None)
    print((Path(args.out) / "results.md").read_text("utf-8"))
    return 0


def add_commands(commands) -> None:
    post = commands.add_parser(
        "posttrain", help="post-train a checkpoint (checkpoint.init_from) on its own spoken "
        "replies with a method (kd, dpo, grpo, or an installed one; resumes from "
        "checkpoint.dir), or compare the methods",
        description="slm posttrain METHOD --config FILE [key=value ...] | slm posttrain compare "
                    "...; `slm posttrain METHOD --help` shows its arguments")
    post.add_argument("method", help="kd, dpo, grpo, a method installed under the entry-point "
                                     "group slm.posttrain_methods, or compare")
    post.add_argument("arguments", nargs=argparse.REMAINDER, help="the method's arguments")
    post.set_defaults(handler=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    """Parse the method's own arguments only now: listing the registered methods imports them,
    and JAX with them, which no other command should wait for."""
    parsed = _methods_parser().parse_args([args.method, *args.arguments])
    parsed.command = args.command
    return parsed.handler(parsed)


def _methods_parser() -> argparse.ArgumentParser:
    from slm.posttrain import METHODS
    from slm.posttrain.compare import CompareSettings

    post = argparse.ArgumentParser(prog="slm posttrain")
    methods = post.add_subparsers(dest="method", required=True)
    summaries = {name: plugin.summary for name, plugin in METHODS.items()}
    installed = [name for name in METHODS.names() if name not in summaries]  # entry points
    for name in [*summaries, *installed]:
        with_config_parser(methods.add_parser(name, help=summaries.get(
            name, "a method installed as an entry point")), _posttrain)

    defaults = CompareSettings()
    compare = methods.add_parser(
        "compare", help="every method from one SFT checkpoint for a few steps; held-out spoken "
                        "and written accuracy, modality gap, repetition and reply length before "
                        "and after (results.json, results.md)")
    compare.add_argument("--checkpoint", required=True, help="the SFT checkpoint directory")
    compare.add_argument("--corpus", required=True,
                         help="the corpus it was trained on (slm corpus synth): held-out questions")
    compare.add_argument("--out", required=True, help="output directory (a rerun resumes)")
    compare.add_argument("--runs", default=",".join(defaults.runs),
                         help="comma-separated methods, and chains of them joined by '+' "
                              "(default: %(default)s)")
    compare.add_argument("--steps", type=int, default=defaults.steps, help="steps per method")
    compare.add_argument("--questions", type=int, default=defaults.questions,
                         help="questions per condition")
    compare.add_argument("--conditions", default=",".join(defaults.conditions),
                         help="comma-separated test conditions of slm.eval.spoken_qa "
                              "(default: %(default)s)")
    compare.add_argument("--judge", default="", help="a `slm judge train` directory: also grade "
                                                     "what the spoken replies say")
    compare.add_argument("--batch-size", type=int, default=defaults.batch_size)
    compare.add_argument("--max-reply-steps", type=int, default=defaults.max_reply_steps)
    compare.add_argument("--ngram", type=int, default=defaults.ngram,
                         help="a reply repeating a word n-gram counts as repetitive")
    compare.add_argument("--rollout-rounds", type=int, default=defaults.rollout_rounds)
    compare.add_argument("overrides", nargs="*",
                         help="key=value overrides of the checkpoint's config for every run, "
                              "e.g. optim.learning_rate=1e-4 posttrain.prompts=16")
    compare.set_defaults(handler=_compare)
    return post

