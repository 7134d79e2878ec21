"""`slm posttrain compare`: the post-training methods from one SFT checkpoint, measured alike.

A run is a chain of registered methods: `kd`, `dpo`, `grpo`, or `kd+dpo`, whose every link
starts from the previous link's result (also its frozen reference, as the recipe's DPO starts
from its KD checkpoint). Each link trains `steps` steps with the SFT checkpoint's own config
(its tokenizers, shards, strategy and model), then `DEFAULTS`, then the given overrides; the KD
teacher is the SFT checkpoint itself reading the transcript unless `posttrain.kd.teacher`
names another. A run's checkpoints live in `out/<run>/model`, and a chain's prefix is the run
of that name, so `kd+dpo` continues from `kd`'s result instead of training KD twice, and a
rerun resumes whatever is unfinished.

The start and every result are then asked the same held-out questions, greedily
(`slm.eval.spoken_qa`): by default the `voices` test set spoken and the same questions written
(`text`); the modality gap is the written accuracy minus the spoken one. Reward hacking is
watched on the same replies (`slm.eval.repetition`). The start model's rollout throughput is
measured beside its sampler alone (`slm.bench.rollout`) on one step's GRPO batch.
`results.json` keeps every number, `results.md` the tables (`slm.posttrain.report`), and
`slm results --posttrain` writes them into the README.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from slm import atomic
from slm.bench.machine import machine_info
from slm.bench.rollout import bench_rollout
from slm.config import Config, config_to_dict, patched_config
from slm.errors import ConfigError
from slm.eval.judge import Judge
from slm.eval.repetition import reply_watch
from slm.eval.spoken_qa import (CONDITIONS, TEXT_CONDITIONS, Question, answers_to_json, ask,
                                build_conditions, listen, reads_text, summarize)
from slm.eval.stats import difference
from slm.posttrain.method import METHODS
from slm.posttrain.report import CHAIN, START, compare_markdown
from slm.posttrain.trainer import posttrain, start_setup
from slm.reply import load_speaker
from slm.train.checkpoint import read_saved

# Over the SFT checkpoint's own config: a post-training rate, and no warm-up in a short run
DEFAULTS = {"optim": {"learning_rate": 5e-4, "warmup_steps": 0},
            "train": {"tensorboard_dir": "", "profile_steps": []}}
# of each link's training; `ties`: DPO's pairs whose replies scored alike (no preference)
TRACKED = ("loss", "reward", "accuracy", "kl", "ties", "reply_steps")


@dataclasses.dataclass
class CompareSettings:
    runs: tuple[str, ...] = ("kd", "dpo", "grpo", "kd+dpo")
    steps: int = 100  # per link
    questions: int = 200  # per condition
    conditions: tuple[str, ...] = ("voices", "text")
    batch_size: int = 32  # questions sampled together
    max_reply_steps: int = 96
    ngram: int = 2  # a reply repeating a word n-gram counts as repetitive
    rollout_rounds: int = 3


def _say(message: str) -> None:
    print(f"[posttrain compare] {message}", file=sys.stderr, flush=True)


def chains(runs: Sequence[str]) -> list[tuple[str, ...]]:
    """Each run's methods in order; an unknown one is named with the registered ones."""
    out = []
    for run in runs:
        links = tuple(run.split(CHAIN))
        for method in links:
            if METHODS.get(method) is None:
                raise ConfigError(f"--runs {run!r}: no post-training method {method!r}; choose "
                                  f"from {', '.join(METHODS.names())}, chained with "
                                  f"'{CHAIN}' (e.g. kd{CHAIN}dpo)")
        out.append(links)
    return out


def check_conditions(conditions: Sequence[str]) -> None:
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown or all(c in TEXT_CONDITIONS for c in conditions):
        raise ConfigError(f"--conditions {','.join(conditions)}: name test conditions of "
                          f"{', '.join(CONDITIONS)}, at least one of them spoken (e.g. voices)"
                          + (f"; unknown: {', '.join(unknown)}" if unknown else ""))


def compare_posttraining(checkpoint: str | Path, corpus: str | Path, out: str | Path,
                         settings: CompareSettings = CompareSettings(),
                         overrides: Sequence[str] = (), judge: str | Path | None = None,
                         mesh=None, progress: bool = True) -> dict:
    """Train every run of `settings.runs` from `checkpoint` (resuming what `out` holds), ask
    the start and each result `corpus`'s held-out questions, and write the results."""
    checkpoint, out = Path(checkpoint).absolute(), Path(out).absolute()
    runs = chains(settings.runs)
    check_conditions(settings.conditions)
    saved, _, _ = read_saved(checkpoint)
    began, seconds = time.perf_counter(), {}

    def link_config(start: Path, model_dir: str, steps: int) -> Config:
        return patched_config(config_to_dict(saved), list(overrides), [DEFAULTS, {
            "train": {"steps": steps},
            "checkpoint": {"dir": model_dir, "init_from": str(start)},
            "posttrain": {"kd": {"teacher": str(checkpoint)}}}], f"{checkpoint} (saved config)")

    report = {"checkpoint": str(checkpoint), "corpus": str(corpus),
              "settings": dataclasses.asdict(settings), "overrides": list(overrides),
              "judge": str(judge) if judge else None, "machine": machine_info(), "models": {}}
    clock = time.perf_counter()
    report["rollout"] = _rollout_throughput(link_config(checkpoint, "", 1), settings, mesh)
    seconds["rollout"] = time.perf_counter() - clock
    _say(f"rollouts {report['rollout']['rollout_tokens_per_s']:,.0f} tokens/s, the sampler alone "
         f"{report['rollout']['decode_tokens_per_s']:,.0f} tokens/s")

    asked = build_conditions(corpus, settings.questions, settings.conditions, saved.seed)
    listened: dict[str, list] = {}  # every model hears the same tokens of each question
    heard_by = Judge.load(judge) if judge else None

    def evaluate(name: str, model_dir: Path) -> dict:
        clock = time.perf_counter()
        result = _evaluate(model_dir, out / name, asked, listened, heard_by, settings, mesh)
        seconds[f"{name}/evaluate"] = time.perf_counter() - clock
        return result

    report["models"][START] = evaluate(START, checkpoint)
    for links in runs:
        start, training = checkpoint, []
        for i in range(len(links)):
            name = CHAIN.join(links[:i + 1])
            model_dir = out / name / "model"
            training.append(_train(links[i], link_config(start, str(model_dir), settings.steps),
                                   out / name, mesh, progress))
            start = model_dir
        name = CHAIN.join(links)
        result = evaluate(name, start)
        result["training"] = training
        before = report["models"][START]["conditions"]
        result["vs_start"] = {c: difference(s["answer"], before[c]["answer"])
                              for c, s in result["conditions"].items() if c in before}
        report["models"][name] = result
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}  # training: per link
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    atomic.write_json(out / "results.json", report)
    atomic.write_text(out / "results.md", compare_markdown(report))
    _say(f"done: {out / 'results.md'}")
    return report


def _rollout_throughput(config: Config, settings: CompareSettings, mesh) -> dict:
    """Rollouts of the start model on the questions of GRPO's first step, each asked
    `posttrain.grpo.group` times, beside its sampler alone."""
    setup, _ = start_setup(config, 1, mesh)
    group = setup.config.posttrain.grpo.group
    grids = [p.grid for p in setup.prompts.batch(1) for _ in range(group)]
    return bench_rollout(setup.rollout, setup.reference, grids, jax.random.key(config.seed),
                         settings.rollout_rounds)


def _train(method: str, config: Config, directory: Path, mesh, progress: bool) -> dict:
    """One link trained (or resumed); what its steps reported is kept in `train.json`."""
    record = directory / "train.json"
    if record.is_file():
        kept = json.loads(record.read_text("utf-8"))
        if kept["steps"] != config.train.steps:
            raise ConfigError(f"{record} holds a {kept['steps']}-step run but --steps is "
                              f"{config.train.steps}; use a new --out (or delete {directory})")
        return kept
    _say(f"{directory.name}: {method}, {config.train.steps} steps from "
         f"{config.checkpoint.init_from}")
    clock = time.perf_counter()
    history = posttrain(config, method, mesh=mesh, progress=progress).history
    kept = {"run": directory.name, "method": method, "steps": config.train.steps,
            "seconds": round(time.perf_counter() - clock, 1),
            "first": _mean_of(history[:max(1, len(history) // 5)]),
            "last": _mean_of(history[-max(1, len(history) // 5):]),
            "history": [{k: v for k, v in h.items() if k != "time"} for h in history]}
    atomic.write_json(record, kept)
    return kept


def _mean_of(history: list[dict]) -> dict:
    return {k: float(np.mean([h[k] for h in history])) for k in TRACKED
            if history and all(k in h for h in history)}


def _evaluate(model_dir: Path, directory: Path, asked: dict[str, list[Question]],
              listened: dict[str, list], judge: Judge | None, settings: CompareSettings,
              mesh) -> dict:
    """Every condition's accuracy and reward-hacking watch, and the modality gaps; the
    answers themselves are kept in `answers.json`, to read what changed."""
    speaker = load_speaker(str(model_dir), mesh=mesh, max_steps=settings.max_reply_steps,
                           greedy=True)
    answers, conditions = [], {}
    for condition, questions in asked.items():
        if condition in TEXT_CONDITIONS and not reads_text(speaker, questions[0]):
            continue
        _say(f"asking {directory.name}: {len(questions)} questions, {condition}")
        if condition not in listened:
            listened[condition] = listen(speaker.tokenizers, questions)
        asked_now = ask(speaker, questions, listened[condition], judge, settings.batch_size)
        conditions[condition] = summarize(asked_now) | reply_watch(asked_now, settings.ngram)
        answers += asked_now
    atomic.write_json(directory / "answers.json", answers_to_json(answers))
    gaps = {spoken: difference(conditions[written]["answer"], conditions[spoken]["answer"])
            for written, spoken in TEXT_CONDITIONS.items()
            if written in conditions and spoken in conditions}
    return {"model": str(model_dir), "conditions": conditions, "modality_gap": gaps}
