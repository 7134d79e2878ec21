"""`slm ...` subcommands: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slm.errors import SlmError


def _train(args: argparse.Namespace) -> int:
    from slm.config import load_config
    from slm.parallel.distributed import initialize_from_env

    config = load_config(args.config, args.overrides)
    initialize_from_env()  # before anything starts a JAX backend
    from slm.train.trainer import train

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


def _plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from slm.config import load_config
    from slm.parallel.plan import format_plan, plan_train_step

    result = plan_train_step(load_config(args.config, args.overrides), args.target, args.devices)
    if args.json:
        print(json.dumps(dataclasses.asdict(result) | {"fits": result.fits}))
    else:
        print(format_plan(result))
    return 0 if result.fits else 1


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
                                args.out, max_seconds=args.max_seconds, workers=args.workers)
    else:
        summary = tokenize_corpus(args.corpus, args.tokenizers, args.out, args.max_seconds,
                                  args.workers)
    for split, stats in sorted(summary.items()):
        skipped = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
        print(f"{split}: {stats['records']} records (skipped {skipped})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import jax

    from slm.reply import load_speaker
    from slm.speech.audio import load_audio, save_wav

    speaker = load_speaker(args.checkpoint, args.tokenizers, max_steps=args.max_steps,
                           cfg_scale=args.cfg_scale, greedy=args.greedy)
    if args.speech_in:
        rate = speaker.tokenizers.units.sample_rate
        user = speaker.hear(load_audio(args.speech_in, rate), rate)
    else:
        user = speaker.read(args.text)
    reply = speaker.reply([user], jax.random.key(args.seed))
    print(f"text reply: {reply.text!r}")
    print(f"steps: {reply.steps} (first text at {reply.steps_to_first_text}, first audio at "
          f"{reply.steps_to_first_audio}), {reply.seconds:.2f} s")
    if reply.wave is not None:
        save_wav(args.out, reply.wave, reply.sample_rate)
        print(f"spoken reply: {args.out} ({reply.wave.size / reply.sample_rate:.2f} s)")
    else:
        print("the model replied without speech; nothing written")
    return 0


def _eval_units(args: argparse.Namespace) -> int:
    from slm.eval.units import phoneme_purity

    result = phoneme_purity(args.corpus, args.tokenizers, args.split)
    print(f"{result['split']}: {result['units']} units over {result['phonemes']} phonemes, "
          f"{result['frames']} frames: purity {result['purity']:.3f}, PNMI {result['pnmi']:.3f}")
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    import json

    from slm.bench.data import bench_data
    from slm.config import load_config
    from slm.strategies import with_strategy_streams
    from slm.train.trainer import vocab_from_config

    config = load_config(args.config, args.overrides)
    config = with_strategy_streams(config, vocab_from_config(config))
    result = bench_data(config, args.seconds, args.steps)
    result["config"] = args.config
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pipeline {result['tokens_per_s']:,.0f} tokens/s vs train step "
              f"{result['peer_tokens_per_s']:,.0f} tokens/s: {result['ratio_vs_peer']:.1f}x")
    return 0


def _bench_print(args: argparse.Namespace, result: dict) -> int:
    import json

    from slm.bench.report import summary

    result["config"] = args.config
    print(json.dumps(result) if args.json else summary(result))
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from slm.bench.train import bench_train
    from slm.config import load_config

    config = load_config(args.config, args.overrides)
    return _bench_print(args, bench_train(config, args.steps, args.rounds, args.vs == "hf"))


def _bench_decode(args: argparse.Namespace) -> int:
    from slm.bench.decode import run_decode_benchmark
    from slm.config import load_config
    from slm.train.trainer import vocab_from_config

    config = load_config(args.config, args.overrides)
    strategies = load_config(args.strategies_config, []) if args.strategies_config else None
    result = run_decode_benchmark(config, vocab_from_config(config), strategies,
                                  tuple(args.batch), args.prompt_len, args.new_tokens,
                                  args.rounds, args.vs == "hf")
    return _bench_print(args, result)


def _bench_report(args: argparse.Namespace) -> int:
    from slm.bench.report import write_report

    print(f"wrote {write_report(args.results, args.out)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from slm.demo import run_demo

    report = run_demo(args.out, args.config, args.overrides, args.questions,
                      judge_steps=args.judge_steps)
    print(f"{report['strategy']}: of {report['questions']} held-out spoken questions, "
          f"{report['spoken_accuracy']:.0%} got a spoken reply with the right answer (text channel "
          f"{report['answer_accuracy']:.0%}); see {args.out}/report.md")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from slm.ablate import run_ablation

    only = args.strategies.split(",") if args.strategies else None
    run_ablation(args.config, args.out, args.overrides, only, args.questions)
    print((Path(args.out) / "results.md").read_text())
    return 0


def _judge_train(args: argparse.Namespace) -> int:
    from slm.eval.judge import judge_split, train_judge

    judge = train_judge(args.corpus, args.out, steps=args.steps, log_every=50)
    result = judge_split(judge, args.corpus, "heldout")
    print(f"judge saved to {args.out}; held-out CER {result['cer']:.3f}, WER {result['wer']:.3f} "
          f"({result['utterances']} utterances, voices never heard in training)")
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


def _convert_hf(args: argparse.Namespace) -> int:
    from slm.convert.hf_import import import_hf

    result = import_hf(args.model_dir, args.out, args.add_speech_vocab, args.param_dtype)
    print(f"{result.family} -> {result.out}: {result.vocab}")
    print(result.stats.describe())
    return 0


def _convert_to_hf(args: argparse.Namespace) -> int:
    from slm.convert.hf_export import export_hf

    result = export_hf(args.checkpoint, args.out, args.dtype)
    print(f"{result.family} text model ({result.vocab_size} ids, tied={result.tied}) -> "
          f"{result.out}; load it with AutoModelForCausalLM.from_pretrained")
    return 0


def with_config_parser(sub: argparse.ArgumentParser, handler,
                       required: bool = True) -> argparse.ArgumentParser:
    sub.add_argument("--config", required=required,
                     help="YAML file, e.g. configs/tiny/synthetic.yaml" + ("" if required else
                                                                         " (default: built-in defaults)"))
    sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    sub.set_defaults(handler=handler)
    return sub


def _bench_parser(bench, name: str, help_text: str, handler) -> argparse.ArgumentParser:
    sub = bench.add_parser(name, help=help_text)
    sub.add_argument("--config", default="configs/bench/llama30m.yaml")
    sub.add_argument("overrides", nargs="*", help="key=value overrides")
    sub.add_argument("--vs", choices=["hf"], help="also time transformers + torch (CPU)")
    sub.add_argument("--rounds", type=int, default=3, help="timing rounds; the best counts")
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    sub.set_defaults(handler=handler)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        return with_config_parser(commands.add_parser(name, help=help_text), handler)

    with_config("train", "train a model (resumes from checkpoint.dir if it holds one)", _train)
    with_config("config", "print the fully resolved config", _show_config)
    plan = with_config("plan", "compile the train step ahead of time for N devices and report "
                                "per-device memory, FLOPs and the replication guard", _plan)
    plan.add_argument("--devices", type=int, help="simulate this many devices (default: the "
                                                  "devices of this machine)")
    plan.add_argument("--target", default="v5p",
                      help="accelerator whose memory must hold the run: v5p (default), v5e, v6e, h100")
    plan.add_argument("--json", action="store_true", help="print one JSON object")

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
    tokenize.set_defaults(handler=_tokenize)

    demo = commands.add_parser("demo", help="synthesize data, train a tiny model, ask it a "
                                             "held-out spoken question (CPU, reuses what exists)")
    demo.add_argument("--out", default="demo", help="output directory (default: demo)")
    demo.add_argument("--config", default="configs/tiny/spoken.yaml")
    demo.add_argument("--questions", type=int, default=10)
    demo.add_argument("--judge-steps", type=int, default=1000,
                      help="training steps of the recognizer that checks the spoken replies")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    demo.set_defaults(handler=_demo)

    sample = commands.add_parser("sample", help="reply to a spoken or written question")
    sample.add_argument("--checkpoint", required=True, help="checkpoint directory of `slm train`")
    question = sample.add_mutually_exclusive_group(required=True)
    question.add_argument("--speech-in", help="a WAV/FLAC question")
    question.add_argument("--text", help="a written question")
    sample.add_argument("--out", default="reply.wav", help="where the spoken reply goes")
    sample.add_argument("--tokenizers", help="tokenizers directory (default: the training config's)")
    sample.add_argument("--max-steps", type=int, default=256)
    sample.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    sample.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1: off)")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_sample)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True)
    data = with_config_parser(bench.add_parser("data", help="input pipeline vs train step tokens/s"),
                              _bench_data)
    data.add_argument("--seconds", type=float, default=5.0)
    data.add_argument("--steps", type=int, default=10)
    data.add_argument("--json", action="store_true", help="print one JSON object")
    train_bench = _bench_parser(bench, "train", "train-step tokens/s and MFU (and the "
                                "transformers peer)", _bench_train)
    train_bench.add_argument("--steps", type=int, default=3, help="train steps per round")
    decode_bench = _bench_parser(bench, "decode", "sampler tokens/s, roofline fraction, time to "
                                 "first audio per strategy (and transformers' generate())",
                                 _bench_decode)
    decode_bench.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    decode_bench.add_argument("--prompt-len", type=int, default=32)
    decode_bench.add_argument("--new-tokens", type=int, default=128)
    decode_bench.add_argument("--strategies-config", default="configs/bench/strategies.yaml",
                              help="models for time to first audio per strategy ('' skips it)")
    report = bench.add_parser("report", help="BENCHMARKS.md from benchmark JSON files")
    report.add_argument("results", nargs="+", help="JSON files of slm bench ... --json")
    report.add_argument("--out", default="BENCHMARKS.md")
    report.set_defaults(handler=_bench_report)

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

    ablate = commands.add_parser("ablate", help="train every strategy alike and compare them on "
                                 "held-out spoken questions (results.json, results.md, plots)")
    ablate.add_argument("--config", default="configs/ablation/tiny.yaml")
    ablate.add_argument("--out", default="ablation", help="output directory (default: ablation)")
    ablate.add_argument("--strategies", default="", help="comma-separated subset (default: all)")
    ablate.add_argument("--questions", type=int, default=None, help="default: the config's")
    ablate.add_argument("overrides", nargs="*", help="key=value overrides for every strategy")
    ablate.set_defaults(handler=_ablate)

    judge = commands.add_parser("judge", help="the recognizer that grades spoken replies")
    judge_train = judge.add_subparsers(dest="judge_command", required=True).add_parser(
        "train", help="train it on a corpus and report its held-out CER")
    judge_train.add_argument("--corpus", required=True)
    judge_train.add_argument("--out", required=True)
    judge_train.add_argument("--steps", type=int, default=1000)
    judge_train.set_defaults(handler=_judge_train)
    convert = commands.add_parser("convert", help="pretrained checkpoints in and out").add_subparsers(
        dest="convert_command", required=True)
    from_hf = convert.add_parser("hf", help="a local Llama/Qwen2/Gemma transformers checkpoint "
                                            "-> an slm checkpoint")
    from_hf.add_argument("--model-dir", required=True, help="config.json, *.safetensors, tokenizer")
    from_hf.add_argument("--out", required=True, help="new checkpoint directory")
    from_hf.add_argument("--add-speech-vocab", metavar="CONFIG",
                         help="slm YAML whose tokenizers/strategy add speech ranges and streams")
    from_hf.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    from_hf.set_defaults(handler=_convert_hf)
    to_hf = convert.add_parser("to-hf", help="the text part of an slm checkpoint -> transformers")
    to_hf.add_argument("--checkpoint", required=True, help="checkpoint directory")
    to_hf.add_argument("--out", required=True, help="new model directory")
    to_hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    to_hf.set_defaults(handler=_convert_to_hf)
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


if __name__ == "__main__":
    sys.exit(main())
