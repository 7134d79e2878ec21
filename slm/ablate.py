"""`slm ablate`: every strategy trained alike, asked the same held-out spoken questions.

One corpus, one set of tokenizers and one judge are shared; each strategy gets the same base
config (model size, data, step budget) with only its strategy section changed, so differences
in the results come from how the strategy lays tokens out. Each finished stage is kept under
`--out` (`<strategy>/model`, `<strategy>/train.json`, `<strategy>/answers.json`, and the first spoken reply as
`<strategy>/reply.wav`), so an
interrupted ablation resumes and a finished one re-renders its report without retraining.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

import jax
import numpy as np
import yaml

from slm import atomic
from slm.config import load_config
from slm.demo import load_or_train_judge, prepare
from slm.errors import ConfigError
from slm.eval.judge import judge_split
from slm.eval.spoken_qa import Answer, answers_to_json, ask_heldout, summarize
from slm.plots import ablation_figures
from slm.reply import load_speaker
from slm.speech.audio import save_wav
from slm.strategies import with_strategy_streams
from slm.train.trainer import train, vocab_from_config


@dataclasses.dataclass
class AblationConfig:
    base: str  # the config every strategy starts from, relative to the ablation file
    strategies: dict[str, dict]  # strategy name -> config patch for it alone
    common: dict = dataclasses.field(default_factory=dict)  # config patch for every strategy
    questions: int = 40  # held-out spoken questions each strategy is asked
    max_reply_steps: int = 96
    judge_steps: int = 1000


def load_ablation(path: str | Path) -> AblationConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ablation config {path} does not exist")
    data = yaml.safe_load(path.read_text("utf-8")) or {}
    fields = {f.name for f in dataclasses.fields(AblationConfig)}
    if not isinstance(data, dict) or set(data) - fields or not {"base", "strategies"} <= set(data):
        raise ConfigError(f"{path}: an ablation config is a mapping with keys {sorted(fields)} "
                          f"('base' and 'strategies' required); got {sorted(data) if isinstance(data, dict) else data!r}")
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
    shared = prepare(out, load_config(ablation.base, overrides, [ablation.common]))
    judge = load_or_train_judge(out, ablation.judge_steps)
    report = {"config": str(config_path), "questions": questions,
              "judge": judge_split(judge, out / "corpus"), "strategies": {}}
    for name in names:
        config = load_config(ablation.base, overrides, [
            ablation.common, {"strategy": {"name": name}}, ablation.strategies[name],
            {"tokenizers": {"dir": shared.tokenizers.dir}, "data": {"dir": shared.data.dir},
             "checkpoint": {"dir": str(out / name / "model")}}])
        training = _train(config, out / name)
        answers = _evaluate(out, name, questions, ablation.max_reply_steps, judge)
        report["strategies"][name] = {**summarize(answers), **training}
        _say(f"{name}: {json.dumps(_headline(report['strategies'][name]))}")
    atomic.write_json(out / "results.json", report)
    atomic.write_text(out / "results.md", results_markdown(report))
    ablation_figures(out, report, {name: _history(out / name) for name in names})
    _say(f"done: {out / 'results.md'}")
    return report


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
    result = train(config)
    history = [{"step": h["step"], "loss": h["loss"], "time": h["time"]} for h in result.history]
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


def _evaluate(out: Path, name: str, questions: int, max_steps: int, judge) -> list[Answer]:
    record = out / name / "answers.json"
    if record.is_file():
        kept = [Answer(**a) for a in json.loads(record.read_text("utf-8"))]
        if len(kept) == questions:
            return kept
    _say(f"asking {name} {questions} held-out spoken questions")
    speaker = load_speaker(str(out / name / "model"), max_steps=max_steps, greedy=True)

    def keep_first_reply(answer: Answer, reply, question_wave) -> None:
        if not (out / name / "reply.wav").exists() and reply.wave is not None:
            save_wav(out / name / "reply.wav", reply.wave, reply.sample_rate)

    answers = ask_heldout(speaker, out / "corpus", questions, judge, keep_first_reply)
    atomic.write_json(record, answers_to_json(answers))
    return answers


HEADLINE = ("answer_accuracy", "spoken_accuracy", "speech_cer", "steps_to_first_audio",
            "ms_to_first_audio", "decode_tokens_per_s", "train_tokens_per_s", "final_loss", "params")


def _headline(result: dict) -> dict:
    return {k: result.get(k) for k in HEADLINE}


def results_markdown(report: dict) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:,.3g}" if isinstance(value, float) else f"{value:,}"

    judge = report["judge"]
    lines = ["# Strategy ablation", "",
             f"{report['questions']} held-out spoken questions per strategy, asked in voices no "
             f"model heard in training; greedy decoding. The judge (a CTC recognizer trained on the "
             f"corpus) has CER {judge['cer']:.3f} / WER {judge['wer']:.3f} on held-out reference "
             "speech.", "",
             "- `answer_accuracy`: the text channel says exactly the expected word.",
             "- `spoken_accuracy`: the judge hears the expected word in the spoken reply.",
             "- `speech_cer`: judge transcript of the spoken reply against the reply's own text.",
             "- latencies: medians over replies; ms include the prompt's prefill on this machine.",
             "- `train_tokens_per_s`: stream tokens (batch x length x streams) per second.", "",
             "| strategy | " + " | ".join(HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    for name, result in report["strategies"].items():
        lines.append(f"| {name} | " + " | ".join(cell(result.get(k)) for k in HEADLINE) + " |")
    lines += ["", "Plots: `loss_curves.png`, `accuracy_vs_latency.png`."]
    return "\n".join(lines) + "\n"
