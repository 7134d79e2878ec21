"""`slm ablate`: every strategy trained alike, asked the same held-out questions under every
test condition (`slm.eval.spoken_qa.CONDITIONS`), judged strictly, with controls.

One corpus, one set of tokenizers and one judge are shared; each strategy gets the same base
config (model size, data, step budget) with only its strategy section changed, so differences
in the results come from how the strategy lays tokens out. Each finished stage is kept under
`--out` (`<strategy>/model`, `<strategy>/train.json`, `<strategy>/answers.json`, and the first spoken reply as
`<strategy>/reply.wav`), so an
interrupted ablation resumes and a finished one re-renders its report without retraining.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path

import jax
import numpy as np

from slm import atomic
from slm.bench.machine import machine_info
from slm.config import load_config, read_yaml_mapping
from slm.demo import load_or_train_judge, prepare
from slm.errors import ConfigError
from slm.eval.judge import judge_report
from slm.eval.spoken_qa import (CONDITIONS, TEXT_CONDITIONS, Answer, Question,
                                answers_to_json, ask, build_conditions, listen, reads_text,
                                summarize, time_replies)
from slm.eval.tables import HEADLINE, results_markdown
from slm.plots import ablation_figures
from slm.reply import load_speaker
from slm.speech.audio import save_wav
from slm.strategies import with_strategy_streams
from slm.train.trainer import train_to_the_end, vocab_from_config


@dataclasses.dataclass
class AblationConfig:
    base: str  # the config every strategy starts from, relative to the ablation file
    strategies: dict[str, dict]  # run name -> config patch for it alone (strategy.name
    #                              defaults to the run name; a patch may set another)
    common: dict = dataclasses.field(default_factory=dict)  # config patch for every strategy
    questions: int = 200  # questions per test condition (the corpus must hold that many)
    conditions: list = dataclasses.field(default_factory=lambda: list(CONDITIONS))
    timed_questions: int = 20  # `voices` questions asked one at a time to time the replies
    batch_size: int = 32  # questions sampled together
    max_reply_steps: int = 96
    judge_steps: int = 1000


def load_ablation(path: str | Path) -> AblationConfig:
    path = Path(path)
    data = read_yaml_mapping(path, "ablation config")
    fields = {f.name for f in dataclasses.fields(AblationConfig)}
    if set(data) - fields or not {"base", "strategies"} <= set(data):
        raise ConfigError(f"{path}: an ablation config is a mapping with keys {sorted(fields)} "
                          f"('base' and 'strategies' required); got {sorted(data)}")
    hints = typing.get_type_hints(AblationConfig)
    for name, value in data.items():
        expected = typing.get_origin(hints[name]) or hints[name]
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: '{name}' must be a {expected.__name__}, got {value!r}")
    ablation = AblationConfig(**data)
    ablation.base = str((path.parent / ablation.base).resolve())
    ablation.strategies = {name: patch or {} for name, patch in ablation.strategies.items()}
    return ablation


def _say(message: str) -> None:
    print(f"[ablate] {message}", file=sys.stderr, flush=True)


def run_ablation(config_path: str | Path, out: str | Path, overrides: list[str] = (),
                 only: list[str] | None = None, questions: int | None = None) -> dict:
    ablation, out = load_ablation(config_path), Path(out).absolute()
    questions = questions or ablation.questions
    names = only or list(ablation.strategies)
    unknown = sorted(set(names) - set(ablation.strategies))
    if unknown:
        raise ConfigError(f"{config_path}: no strategy {unknown[0]!r} under 'strategies' "
                          f"(it has {', '.join(ablation.strategies)})")
    clock = _StageClock()
    with clock("prepare"):
        shared = prepare(out, load_config(ablation.base, overrides, [ablation.common]))
    with clock("judge"):
        judge = load_or_train_judge(out, ablation.judge_steps)
        judged = judge_report(judge, out / "corpus")
    _say(f"judge CER on held-out reference speech: {judged['heldout_voices']['cer']:.3f} (new "
         f"voices), {judged['assistant_voice']['cer']:.3f} (the assistant's voice, never trained on)")
    asked = build_conditions(out / "corpus", questions, ablation.conditions, shared.seed)
    listened: dict[str, list] = {}  # every model hears the same tokens of each question
    report = {"config": str(config_path), "questions": questions, "judge": judged,
              "conditions": list(asked), "strategies": {}}
    for name in names:
        config = load_config(ablation.base, overrides, [
            ablation.common, {"strategy": {"name": name}}, ablation.strategies[name],
            {"tokenizers": {"dir": shared.tokenizers.dir}, "data": {"dir": shared.data.dir},
             "checkpoint": {"dir": str(out / name / "model")}}])
        clock.resumed |= (out / name / "train.json").is_file()
        with clock(f"{name}/train"):
            training = _train(config, out / name)
        with clock(f"{name}/evaluate"):
            answers = _evaluate(out, name, ablation, asked, listened, judge)
        report["strategies"][name] = {"strategy": config.strategy.name,
                                      **_strategy_summary(answers), **training}
        _say(f"{name}: {json.dumps({k: report['strategies'][name].get(k) for k in HEADLINE})}")
    report["run"] = clock.record()
    atomic.write_json(out / "results.json", report)
    atomic.write_text(out / "results.md", results_markdown(report))
    ablation_figures(out, report, {name: _history(out / name) for name in names})
    _say(f"done: {out / 'results.md'}")
    return report


class _StageClock:
    """Wall seconds of each stage of this invocation, with the machine they ran on and how busy
    its cores were (the 1-minute load average at the end): the ablation's own cost, measured."""

    def __init__(self):
        self.start, self.seconds, self.machine = time.perf_counter(), {}, machine_info()
        self.resumed = False  # a stage finished by an earlier invocation was reused

    @contextlib.contextmanager
    def __call__(self, stage: str):
        began = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - began, 1)
        _say(f"{stage} took {self.seconds[stage] / 60:.1f} min")

    def record(self) -> dict:
        return {"machine": self.machine, "stage_seconds": self.seconds, "resumed": self.resumed,
                "total_seconds": round(time.perf_counter() - self.start, 1),
                "load_average_at_end": os.getloadavg()[0]}


def _train(config, out: Path) -> dict:
    """Train (or resume) one strategy; its loss curve and throughput are kept in train.json."""
    record = out / "train.json"
    if record.is_file():
        summary = json.loads(record.read_text("utf-8"))["summary"]
        if summary["train_steps"] != config.train.steps:
            raise ConfigError(
                f"{record} holds a {summary['train_steps']}-step run but the config asks for "
                f"train.steps={config.train.steps}; use a new --out (or delete {out}) to retrain")
        return summary
    _say(f"training {config.strategy.name} ({config.train.steps} steps)")
    result = train_to_the_end(config)
    history = [{k: v for k, v in h.items() if k in ("step", "loss", "time") or k.startswith("eval/")}
               for h in result.history]
    streams = with_strategy_streams(config, vocab_from_config(config)).model.streams
    tokens_per_step = config.data.batch_size * config.data.seq_len * len(streams)
    steady = history[len(history) // 10:]  # past compilation and warm-up
    seconds = steady[-1]["time"] - steady[0]["time"] if len(steady) > 1 else float("nan")
    summary = {"final_loss": float(np.mean([h["loss"] for h in history[-20:]])),
               "train_tokens_per_s": tokens_per_step * (len(steady) - 1) / seconds,
               "train_steps": config.train.steps,
               "params": int(sum(x.size for x in jax.tree.leaves(result.state.params)))}
    atomic.write_json(record, {"summary": summary, "history": history})
    return summary


def _history(out: Path) -> list[dict]:
    return json.loads((out / "train.json").read_text("utf-8"))["history"]


def _evaluate(out: Path, name: str, ablation: AblationConfig, asked: dict[str, list[Question]],
              listened: dict[str, list], judge) -> list[Answer]:
    """Every condition's answers plus the timed `voices` replies (condition `timed`), kept in
    `<name>/answers.json` and reused while they cover the same questions."""
    record = out / name / "answers.json"
    timed = asked.get("voices", [])[:ablation.timed_questions]
    wanted = {q.id + q.condition for qs in asked.values() for q in qs} | {q.id + "timed" for q in timed}
    if record.is_file():
        kept = [Answer(**a) for a in json.loads(record.read_text("utf-8"))]
        have = {a.id + a.condition for a in kept}
        written = {q.id + q.condition for c in TEXT_CONDITIONS for q in asked.get(c, [])}
        if have <= wanted and wanted - have <= written:  # a strategy may not read text
            return kept
    speaker = load_speaker(str(out / name / "model"), max_steps=ablation.max_reply_steps, greedy=True)
    answers = []
    for condition, questions in asked.items():
        if condition in TEXT_CONDITIONS and not reads_text(speaker, questions[0]):
            _say(f"{name} cannot lay out a written question; no {condition} answers")
            continue
        _say(f"asking {name}: {len(questions)} questions, {condition}")
        if condition not in listened:
            listened[condition] = listen(speaker.tokenizers, questions)
        answers += ask(speaker, questions, listened[condition], judge, ablation.batch_size)

    def keep_first_reply(answer: Answer, reply, question) -> None:
        if not (out / name / "reply.wav").exists() and reply.wave is not None:
            save_wav(out / name / "reply.wav", reply.wave, reply.sample_rate)

    answers += time_replies(speaker, [dataclasses.replace(q, condition="timed") for q in timed],
                            listened.get("voices", [])[:len(timed)], judge, keep_first_reply)
    atomic.write_json(record, answers_to_json(answers))
    return answers


def _strategy_summary(answers: list[Answer]) -> dict:
    """Per condition summaries, with the headline (the `voices` set, latency from the timed
    replies) at the top level."""
    conditions = {c: summarize([a for a in answers if a.condition == c])
                  for c in dict.fromkeys(a.condition for a in answers) if c != "timed"}
    timed = summarize([a for a in answers if a.condition == "timed"])
    voices = conditions.get("voices", timed)
    return {"answer_accuracy": voices["answer"]["accuracy"],
            "spoken_accuracy": voices.get("spoken", {}).get("accuracy"),
            "speech_cer": voices.get("speech_cer"),
            "accuracy_by_kind": {k: v["accuracy"] for k, v in voices["by_kind"].items()},
            "steps_to_first_audio": voices["steps_to_first_audio"],
            "ms_to_first_audio": timed["ms_to_first_audio"],
            "decode_tokens_per_s": timed["decode_tokens_per_s"],
            "conditions": conditions}
