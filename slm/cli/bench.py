"""`slm bench train|decode|data|lora|hearing|stream|report`: measured against peers, the
machine's limits, another way to train, or another streaming pace."""

from __future__ import annotations

import argparse

from slm.cli.args import shipped_config


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


def _bench_lora(args: argparse.Namespace) -> int:
    from slm.bench.lora import bench_lora
    from slm.config import load_config

    config = load_config(args.config, args.overrides)
    return _bench_print(args, bench_lora(config, args.rank, tuple(args.targets), args.steps,
                                         args.rounds))


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


def _bench_hearing(args: argparse.Namespace) -> int:
    import json

    from slm.bench.hearing import bench_hearing, summary
    from slm.config import load_config

    result = bench_hearing(load_config(args.config, args.overrides), args.out, args.steps,
                           args.rounds)
    result["config"] = args.config
    print(json.dumps(result) if args.json else summary(result))
    return 0


def _bench_stream(args: argparse.Namespace) -> int:
    import json

    from slm import atomic
    from slm.bench.stream import bench_stream, summary

    result = bench_stream(args.checkpoint, args.root, args.omega, args.questions, args.max_steps,
                          args.judge_steps)
    atomic.write_json(args.out, result)
    print(json.dumps(result) if args.json else f"{summary(result)}\nwrote {args.out}")
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from slm.bench.report import write_report

    print(f"wrote {write_report(args.results, args.out)}")
    return 0


def _bench_parser(bench, name: str, help_text: str, handler,
                  peer: bool = True) -> argparse.ArgumentParser:
    """Every benchmark defaults to the 30M Llama-shaped model and can print one JSON object."""
    sub = bench.add_parser(name, help=help_text)
    sub.add_argument("--config", default="configs/bench/llama30m.yaml", type=shipped_config)
    sub.add_argument("overrides", nargs="*", help="key=value overrides")
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    if peer:
        sub.add_argument("--vs", choices=["hf"], help="also time transformers + torch (CPU)")
        sub.add_argument("--rounds", type=int, default=3, help="timing rounds; the best counts")
    sub.set_defaults(handler=handler)
    return sub


def add_commands(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True)
    data = _bench_parser(bench, "data", "input pipeline vs train step tokens/s", _bench_data,
                         peer=False)
    data.add_argument("--seconds", type=float, default=5.0)
    data.add_argument("--steps", type=int, default=10)
    train_bench = _bench_parser(bench, "train", "train-step tokens/s and MFU (and the "
                                "transformers peer)", _bench_train)
    train_bench.add_argument("--steps", type=int, default=3, help="train steps per round")
    lora_bench = _bench_parser(bench, "lora", "full fine-tuning vs LoRA: optimizer-state "
                               "bytes and step time", _bench_lora, peer=False)
    lora_bench.add_argument("--rank", type=int, default=8)
    lora_bench.add_argument("--targets", nargs="+", default=["q", "k", "v", "o", "gate", "up",
                                                             "down"])
    lora_bench.add_argument("--steps", type=int, default=3, help="train steps per round")
    lora_bench.add_argument("--rounds", type=int, default=3, help="timing rounds; the best counts")
    decode_bench = _bench_parser(bench, "decode", "sampler tokens/s, roofline fraction, time to "
                                 "first audio per strategy (and transformers' generate())",
                                 _bench_decode)
    decode_bench.set_defaults(rounds=5)  # more rounds: the roofline fraction is a median of them
    decode_bench.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    decode_bench.add_argument("--prompt-len", type=int, default=32)
    decode_bench.add_argument("--new-tokens", type=int, default=128)
    decode_bench.add_argument("--strategies-config", default="configs/bench/strategies.yaml",
                              type=shipped_config,
                              help="models for time to first audio per strategy ('' skips it)")
    hearing = _bench_parser(bench, "hearing", "train-step time of cached encoder states vs the "
                            "encoder run inside the model", _bench_hearing, peer=False)
    hearing.set_defaults(config="configs/tiny/spoken.yaml")
    hearing.add_argument("--out", default="runs/bench-hearing",
                         help="corpus, tokenizers and both kinds of shards (reused when there)")
    hearing.add_argument("--steps", type=int, default=3, help="train steps per round")
    hearing.add_argument("--rounds", type=int, default=3, help="timing rounds; the best counts")
    stream = bench.add_parser("stream", help="a text-driven checkpoint's replies streamed every "
                              "Ω text tokens: steps and ms to first audio, judge CER, per Ω")
    stream.add_argument("--checkpoint", required=True)
    stream.add_argument("--root", required=True, help="a `slm demo` or `slm ablate` output: the "
                        "voices test set of its corpus/, its judge/ (trained there if missing)")
    stream.add_argument("--omega", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="text tokens per streamed chunk")
    stream.add_argument("--questions", type=int, default=20)
    stream.add_argument("--max-steps", type=int, default=96, help="reply steps at most")
    stream.add_argument("--judge-steps", type=int, default=1000)
    stream.add_argument("--out", required=True, help="the results as JSON")
    stream.add_argument("--json", action="store_true", help="print the JSON object, not the table")
    stream.set_defaults(handler=_bench_stream)
    report = bench.add_parser("report", help="BENCHMARKS.md from benchmark JSON files")
    report.add_argument("results", nargs="+", help="JSON files of slm bench ... --json")
    report.add_argument("--out", default="BENCHMARKS.md")
    report.set_defaults(handler=_bench_report)
