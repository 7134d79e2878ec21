"""`slm demo`: from nothing to a spoken answer on a CPU, every step reused when run again.

Synthesize the embedded corpus, fit the tokenizers, tokenize, train a tiny model with one
strategy, then ask it held-out spoken questions (voices it never heard) and write the first
reply as `reply.wav`, a picture of it and a report with accuracy and latency.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from slm.config import Config, load_config
from slm.data.closed_world import QA, answer_is_correct
from slm.data.corpus import load_manifest, synthesize_corpus
from slm.data.prepare import tokenize_corpus, train_corpus_tokenizers
from slm.data.tokenizers import INDEX_FILE
from slm.plots import reply_figure
from slm.reply import Reply, load_speaker
from slm.speech.audio import load_audio, save_wav
from slm.train.trainer import train


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def prepare(out: Path, config: Config) -> Config:
    """Corpus, tokenizers and shards under `out` (each skipped when already complete)."""
    corpus = synthesize_corpus(out / "corpus", seed=config.seed, sizes=config.corpus)
    if not (out / "tokenizers" / INDEX_FILE).is_file():
        _say("fitting text, unit and codec tokenizers")
        train_corpus_tokenizers(config.tokenizers, corpus, out / "tokenizers", config.seed)
    _say("tokenizing the corpus")
    tokenize_corpus(corpus, out / "tokenizers", out / "shards", config.tokenizers.max_seconds)
    return dataclasses.replace(
        config,
        tokenizers=dataclasses.replace(config.tokenizers, dir=str(out / "tokenizers")),
        data=dataclasses.replace(config.data, dir=str(out / "shards")),
        checkpoint=dataclasses.replace(config.checkpoint, dir=str(out / "model")),
    )


def ask(out: Path, questions: int, max_steps: int) -> dict:
    """Reply to held-out spoken questions; returns the report."""
    speaker = load_speaker(str(out / "model"), max_steps=max_steps, greedy=True)
    corpus = out / "corpus"
    utterances = {u["id"]: u for u in load_manifest(corpus / "heldout" / "utterances.jsonl")}
    dialogues = [json.loads(line) for line in
                 (corpus / "heldout" / "dialogues.jsonl").read_text().splitlines()][:questions]
    rate = speaker.tokenizers.units.sample_rate
    results, first = [], None
    for i, dialogue in enumerate(dialogues):
        question = utterances[dialogue["question_id"]]
        wave = load_audio(corpus / question["audio"], rate)
        reply = speaker.reply([speaker.hear(wave, rate)], jax.random.key(i))
        first = first or (dialogue, reply, wave)
        qa = QA(dialogue["question"], dialogue["answer"], dialogue["kind"])
        results.append({"question": dialogue["question"], "voice": question["voice"],
                        "expected": dialogue["answer"], "text_answer": reply.text,
                        "correct": answer_is_correct(reply.text, qa), "steps": reply.steps,
                        "steps_to_first_audio": reply.steps_to_first_audio,
                        "ms_to_first_audio": None if reply.seconds_to_first_audio is None
                        else 1000 * reply.seconds_to_first_audio,
                        "seconds": reply.seconds})
        _say(f"{dialogue['question']!r} -> {reply.text!r} "
             f"({'right' if results[-1]['correct'] else 'wrong'})")
    _write_first(out, speaker, *first)
    accuracy = float(np.mean([r["correct"] for r in results]))
    return {"strategy": speaker.strategy.name, "questions": len(results),
            "answer_accuracy": accuracy, "results": results}


def _write_first(out: Path, speaker, dialogue: dict, reply: Reply, question_wave) -> None:
    save_wav(out / "question.wav", question_wave, speaker.tokenizers.units.sample_rate)
    if reply.wave is not None:
        save_wav(out / "reply.wav", reply.wave, reply.sample_rate)
    reply_tokens = reply.grid.tokens[:, -reply.steps:] if reply.steps else reply.grid.tokens[:, :0]
    reply_figure(out / "reply.png", reply.wave, reply.sample_rate, reply_tokens,
                 [s.name for s in speaker.sampler.streams], speaker.vocab,
                 f"{dialogue['question']!r} -> {reply.text!r}")


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# slm demo ({report['strategy']})", "",
             f"Held-out spoken questions (voices never heard in training): {report['questions']}, "
             f"text answers correct: {report['answer_accuracy']:.0%}.", "",
             "| question | voice | expected | text answer | correct | steps / ms to first audio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['question']} | {r['voice']} | {r['expected']} | {r['text_answer']} | "
              f"{'yes' if r['correct'] else 'no'} | {r['steps_to_first_audio']} / "
              f"{r['ms_to_first_audio'] or 0:.0f} |" for r in report["results"]]
    lines += ["", "The first question and its reply: `question.wav`, `reply.wav`, `reply.png`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run_demo(out: str | Path, config_path: str, overrides: list[str], questions: int = 10,
             max_steps: int = 96) -> dict:
    out = Path(out).absolute()
    config = prepare(out, load_config(config_path, overrides))
    _say(f"training a tiny {config.strategy.name} model ({config.train.steps} steps; resumes)")
    if not train(config).history:
        _say(f"the model in {out / 'model'} is already trained to step {config.train.steps}; reusing it")
    _say("asking held-out spoken questions")
    report = ask(out, questions, max_steps)
    write_report(out, report)
    _say(f"done: {out / 'report.md'}, {out / 'reply.wav'}, {out / 'reply.png'}")
    return report
