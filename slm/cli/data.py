"""Commands that build data: corpus synth, tokenizers train, tokenize."""

from __future__ import annotations

import argparse
import os

from slm.cli.args import with_config_parser


def _corpus_synth(args: argparse.Namespace) -> int:
    from slm.data.corpus import synthesize_corpus

    out = synthesize_corpus(args.out, seed=args.seed)
    print(f"corpus written to {out}")
    return 0


def _tokenizers_train(args: argparse.Namespace) -> int:
    from slm.config import load_config
    from slm.data.prepare import train_corpus_tokenizers

    config = load_config(args.config, args.overrides)
    tokenizers = train_corpus_tokenizers(config.tokenizers, args.corpus, args.out, config.seed)
    print(f"tokenizers written to {args.out}; vocabulary: {tokenizers.vocab()}")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from slm.data.prepare import tokenize_corpus, tokenize_tfds

    if args.tfds:
        summary = tokenize_tfds(args.tfds_data_dir, args.tfds, args.tfds_split, args.tokenizers,
                                args.out, max_seconds=args.max_seconds, workers=args.workers,
                                features=args.features)
    else:
        summary = tokenize_corpus(args.corpus, args.tokenizers, args.out, args.max_seconds,
                                  args.workers, features=args.features)
    for split, stats in sorted(summary.items()):
        skipped = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
        print(f"{split}: {stats['records']} records (skipped {skipped})")
    return 0


def add_commands(commands) -> None:
    corpus = commands.add_parser("corpus", help="the embedded spoken corpus").add_subparsers(
        dest="corpus_command", required=True)
    synth = corpus.add_parser("synth", help="synthesize it with espeak-ng (resumable)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_corpus_synth)

    tokenizers = commands.add_parser("tokenizers", help="text/unit/codec tokenizers").add_subparsers(
        dest="tokenizers_command", required=True)
    fit = with_config_parser(tokenizers.add_parser(
        "train", help="fit text, phonetic-unit and codec tokenizers on a corpus"), _tokenizers_train,
        required=False)
    fit.add_argument("--corpus", required=True, help="corpus directory (slm corpus synth)")
    fit.add_argument("--out", required=True, help="where the tokenizers are saved")

    tokenize = commands.add_parser("tokenize", help="tokenize a corpus into ArrayRecord shards")
    source = tokenize.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="an embedded corpus (slm corpus synth)")
    source.add_argument("--tfds", help="a prepared TFDS dataset, e.g. slm_audio_folder, "
                                       "slm_librispeech/dev_clean")
    tokenize.add_argument("--tfds-data-dir", help="TFDS data_dir holding --tfds")
    tokenize.add_argument("--tfds-split", default="train")
    tokenize.add_argument("--tokenizers", required=True, help="directory from `slm tokenizers train`")
    tokenize.add_argument("--out", required=True)
    tokenize.add_argument("--max-seconds", type=float, default=30.0)
    tokenize.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    tokenize.add_argument("--features", nargs="?", const="states", default="",
                          choices=["states", "log_mel"],
                          help="also keep speech frames for models trained with "
                               "strategy.user_input=features: the unit encoder's states (the "
                               "default), or log_mel for a model that runs its own encoder")
    tokenize.set_defaults(handler=_tokenize)
