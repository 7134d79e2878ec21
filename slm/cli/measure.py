"""Measurements of the speech side: eval units|resynthesis and the judge that grades replies."""

from __future__ import annotations

import argparse


def _eval_units(args: argparse.Namespace) -> int:
    from slm.eval.units import phoneme_purity

    result = phoneme_purity(args.corpus, args.tokenizers, args.split)
    print(f"{result['split']}: {result['units']} units over {result['phonemes']} phonemes, "
          f"{result['frames']} frames: purity {result['purity']:.3f}, PNMI {result['pnmi']:.3f}")
    return 0


def _eval_resynthesis(args: argparse.Namespace) -> int:
    import json

    from slm.data.tokenizers import TokenizerSet
    from slm.eval.judge import Judge
    from slm.eval.resynthesis import resynthesis_report

    report = resynthesis_report(Judge.load(args.judge), TokenizerSet.load(args.tokenizers),
                                args.corpus, args.split, args.limit)
    print(json.dumps(report, indent=1))
    return 0


def _judge_train(args: argparse.Namespace) -> int:
    from slm.eval.judge import judge_split, train_judge

    judge = train_judge(args.corpus, args.out, steps=args.steps, log_every=50)
    result = judge_split(judge, args.corpus, "heldout")
    print(f"judge saved to {args.out}; held-out CER {result['cer']:.3f}, WER {result['wer']:.3f} "
          f"({result['utterances']} utterances, voices never heard in training)")
    return 0


def add_commands(commands) -> None:
    evaluate = commands.add_parser("eval", help="measurements").add_subparsers(
        dest="eval_command", required=True)
    units = evaluate.add_parser("units", help="phoneme purity and PNMI of the phonetic units")
    units.add_argument("--corpus", required=True)
    units.add_argument("--tokenizers", required=True)
    units.add_argument("--split", default="heldout")
    units.set_defaults(handler=_eval_units)
    resynthesis = evaluate.add_parser("resynthesis", help="judge CER and LSD of speech after the "
                                                          "codec and the unit vocoder")
    resynthesis.add_argument("--corpus", required=True)
    resynthesis.add_argument("--tokenizers", required=True)
    resynthesis.add_argument("--judge", required=True, help="directory from `slm judge train`")
    resynthesis.add_argument("--split", default="heldout")
    resynthesis.add_argument("--limit", type=int)
    resynthesis.set_defaults(handler=_eval_resynthesis)

    judge = commands.add_parser("judge", help="the recognizer that grades spoken replies")
    judge_train = judge.add_subparsers(dest="judge_command", required=True).add_parser(
        "train", help="train it on a corpus and report its held-out CER")
    judge_train.add_argument("--corpus", required=True)
    judge_train.add_argument("--out", required=True)
    judge_train.add_argument("--steps", type=int, default=1000)
    judge_train.set_defaults(handler=_judge_train)
