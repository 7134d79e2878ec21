"""Commands that train, plan and talk to a model: train, config, plan, demo, sample, ablate,
results."""

from __future__ import annotations

import argparse
from pathlib import Path

from slm.cli.args import shipped_config, with_config_parser


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
    from slm.train.plan import format_plan, plan_train_step

    result = plan_train_step(load_config(args.config, args.overrides), args.target, args.devices)
    if args.json:
        print(json.dumps(dataclasses.asdict(result) | {"fits": result.fits}))
    else:
        print(format_plan(result))
    return 0 if result.fits else 1


def _demo(args: argparse.Namespace) -> int:
    from slm.demo import run_demo

    report = run_demo(args.out, args.config, args.overrides, args.questions,
                      judge_steps=args.judge_steps)
    print(f"{report['strategy']}: of {report['questions']} held-out spoken questions, "
          f"{report['spoken']['accuracy']:.0%} got a spoken reply of exactly the answer (text channel "
          f"{report['answer']['accuracy']:.0%}); see {args.out}/report.md")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import jax

    from slm.errors import ConfigError
    from slm.reply import load_speaker
    from slm.speech.audio import read_audio, resample, save_wav

    if args.task == "transcribe" and not args.speech_in:
        raise ConfigError("--task transcribe transcribes speech: give --speech-in <wav>")
    question = read_audio(args.speech_in) if args.speech_in else None  # before the model loads
    mesh = None
    if args.mesh:
        from slm.parallel.mesh import mesh_of

        mesh = mesh_of(args.mesh)
    speaker = load_speaker(args.checkpoint, args.tokenizers, mesh=mesh, task=args.task or "",
                           max_steps=args.max_steps, cfg_scale=args.cfg_scale, greedy=args.greedy)
    if question is not None:
        rate = speaker.tokenizers.units.sample_rate
        user = speaker.hear(resample(*question, rate), rate)
    else:
        user = speaker.read(args.text)
    reply = speaker.reply([user], jax.random.key(args.seed))
    if args.task == "transcribe":
        print(f"transcript: {reply.text!r}")
        timed = speaker.timed_words(reply.written)
        if timed:
            print("word times: " + ", ".join(f"{w} {a:.2f}-{b:.2f}" for w, a, b in timed))
        return 0
    print(f"text reply: {reply.text!r}")
    print(f"steps: {reply.steps} (first text at {reply.steps_to_first_text}, first audio at "
          f"{reply.steps_to_first_audio}), {reply.seconds:.2f} s")
    if reply.wave is not None:
        save_wav(args.out, reply.wave, reply.sample_rate)
        print(f"spoken reply: {args.out} ({reply.wave.size / reply.sample_rate:.2f} s)")
    else:
        print("the model replied without speech; nothing written")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from slm.ablate import run_ablation

    only = args.strategies.split(",") if args.strategies else None
    run_ablation(args.config, args.out, args.overrides, only, args.questions)
    print((Path(args.out) / "results.md").read_text())
    return 0


def _results(args: argparse.Namespace) -> int:
    import json

    from slm.errors import DataError
    from slm.eval.tables import fill_readme

    def read(directory: str, command: str = "slm ablate") -> dict:
        results = Path(directory) / "results.json"
        if not results.is_file():
            raise DataError(f"{results}: no such file; run `{command} --out {directory}` first")
        return json.loads(results.read_text("utf-8"))

    features = read(args.features) if args.features else None
    units = read(args.units) if args.units else None
    demo = _demo_loss(Path(args.demo), Path(args.readme).parent) if args.demo else None
    posttrain = None
    if args.posttrain:
        from slm.posttrain.report import compare_readme

        posttrain = compare_readme(read(args.posttrain, "slm posttrain compare"))
    fill_readme(args.readme, read(args.ablation) if args.ablation else None, features, units, demo,
                posttrain)
    print(f"{args.readme}: generated blocks rewritten from " + ", ".join(
        d for d in (args.ablation, args.features, args.units, args.demo, args.posttrain) if d))
    return 0


def _demo_loss(demo: Path, readme_dir: Path) -> str:
    """The demo's loss figure copied beside the README, and its block's text."""
    import json
    import shutil

    from slm.demo import HISTORY
    from slm.errors import DataError
    from slm.eval.tables import DEMO_FIGURE, demo_loss_text

    if not (demo / HISTORY).is_file() or not (demo / "loss.png").is_file():
        raise DataError(f"{demo}: no {HISTORY} and loss.png; run `slm demo --out {demo}` first")
    figure = readme_dir / DEMO_FIGURE
    figure.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo / "loss.png", figure)
    report = json.loads((demo / "report.json").read_text("utf-8"))
    return demo_loss_text(json.loads((demo / HISTORY).read_text("utf-8")), report["strategy"])


def add_commands(commands) -> None:
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

    demo = commands.add_parser("demo", help="synthesize data, train a tiny model, ask it a "
                                             "held-out spoken question (CPU, reuses what exists)")
    demo.add_argument("--out", default="demo", help="output directory (default: demo)")
    demo.add_argument("--config", default="configs/tiny/spoken.yaml", type=shipped_config)
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
    sample.add_argument("--task", choices=("answer", "transcribe"),
                        help="what the reply does (default: as trained); transcribe: the "
                             "transcript of --speech-in, from a model trained with asr pairs")
    sample.add_argument("--out", default="reply.wav", help="where the spoken reply goes")
    sample.add_argument("--tokenizers", help="tokenizers directory (default: the training config's)")
    sample.add_argument("--max-steps", type=int, default=256)
    sample.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    sample.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1: off)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--mesh", help="decode across devices, e.g. tensor=4 (heads split) or "
                                       "data=2,tensor=2 (default: the training config's mesh)")
    sample.set_defaults(handler=_sample)

    ablate = commands.add_parser("ablate", help="train every strategy alike and compare them on "
                                 "held-out spoken questions (results.json, results.md, plots)")
    ablate.add_argument("--config", default="configs/ablation/tiny.yaml", type=shipped_config)
    ablate.add_argument("--out", default="ablation", help="output directory (default: ablation)")
    ablate.add_argument("--strategies", default="", help="comma-separated subset (default: all)")
    ablate.add_argument("--questions", type=int, default=None, help="default: the config's")
    ablate.add_argument("overrides", nargs="*", help="key=value overrides for every strategy")
    ablate.set_defaults(handler=_ablate)

    results = commands.add_parser("results", help="rewrite the README's ablation block from results")
    results.add_argument("--ablation", default="ablation",
                         help="an `slm ablate --out` directory ('' leaves its tables as they are)")
    results.add_argument("--features", default="",
                         help="an `slm ablate --out` directory of the same ablation with "
                              "strategy.user_input=features: the units-vs-features table")
    results.add_argument("--units", default="",
                         help="the units side of that table (default: --ablation), e.g. a run "
                              "of the same strategies with the same code as --features")
    results.add_argument("--demo", default="",
                         help="an `slm demo --out` directory: its training vs held-out loss curve")
    results.add_argument("--posttrain", default="",
                         help="an `slm posttrain compare --out` directory: the post-training "
                              "methods' table")
    results.add_argument("--readme", default="README.md")
    results.set_defaults(handler=_results)
