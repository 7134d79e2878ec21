"""`slm demo`: from nothing to a spoken answer on a CPU, every step reused when run again.

Synthesize the embedded corpus, fit the tokenizers, tokenize, train a tiny model with one
strategy and a judge (a small recognizer), then ask the model held-out spoken questions (voices
it never heard), let the judge listen to the spoken replies, and write the first reply as
`reply.wav`, a picture of it and a report with accuracy and latency.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from slm import atomic
from slm.config import Config, load_config
from slm.data.corpus import synthesize_corpus
from slm.data.prepare import tokenize_corpus, train_corpus_tokenizers
from slm.data.tokenizers import INDEX_FILE
from slm.eval.judge import Judge, judge_report, train_judge
from slm.eval.spoken_qa import (SAMPLE_RATE, Answer, Question, answers_to_json,
                                build_conditions, listen, summarize, time_replies)
from slm.plots import reply_figure, run_loss_figure
from slm.reply import Reply, load_speaker
from slm.speech.audio import save_wav
from slm.train.trainer import train_to_the_end

JUDGE_STEPS = 1000
HISTORY = "train_history.json"  # training and held-out losses per step (slm.train.evaluate)


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def prepare(out: Path, config: Config) -> Config:
    """Corpus, tokenizers and shards under `out` (each skipped when already complete)."""
    corpus = synthesize_corpus(out / "corpus", seed=config.seed, sizes=config.corpus)
    if not (out / "tokenizers" / INDEX_FILE).is_file():
        _say("fitting text, unit and codec tokenizers")
        train_corpus_tokenizers(config.tokenizers, corpus, out / "tokenizers", config.seed)
    _say("tokenizing the corpus")
    tokenize_corpus(corpus, out / "tokenizers", out / "shards", config.tokenizers.max_seconds,
                    features=config.tokenizers.features if config.tokenizers.cache_features else "")
    return dataclasses.replace(
        config,
        tokenizers=dataclasses.replace(config.tokenizers, dir=str(out / "tokenizers")),
        data=dataclasses.replace(config.data, dir=str(out / "shards")),
        checkpoint=dataclasses.replace(config.checkpoint, dir=str(out / "model")),
    )


def load_or_train_judge(out: Path, steps: int = JUDGE_STEPS) -> Judge:
    """The recognizer that checks the replies are audible, trained once on the corpus."""
    if (out / "judge" / "judge.json").is_file():
        return Judge.load(out / "judge")
    _say(f"training the judge (a small CTC recognizer, {steps} steps; never hears the assistant)")
    judge = train_judge(out / "corpus", out / "judge", steps=steps, log_every=100)
    report = judge_report(judge, out / "corpus")
    _say(f"judge CER on held-out reference speech: {report['heldout_voices']['cer']:.3f} in new "
         f"voices, {report['assistant_voice']['cer']:.3f} in the assistant's voice")
    return judge


def ask(out: Path, questions: int, max_steps: int, judge: Judge) -> dict:
    """Reply to held-out spoken questions (the `voices` test set), one at a time and timed."""
    speaker = load_speaker(str(out / "model"), max_steps=max_steps, greedy=True)
    asked = build_conditions(out / "corpus", questions, ("voices",))["voices"]
    first = []

    def show(answer: Answer, reply: Reply, question: Question) -> None:
        first.append((answer, reply, question.wave))
        _say(f"{answer.question!r} -> text {answer.text_answer!r}, heard {answer.heard!r} "
             f"({'right' if answer.spoken_correct else 'wrong'})")

    answers = time_replies(speaker, asked, listen(speaker.tokenizers, asked), judge, show)
    _write_first(out, speaker, *first[0])
    return {"strategy": speaker.strategy.name, **summarize(answers),
            "judge": judge_report(judge, out / "corpus"), "results": answers_to_json(answers)}


def _write_first(out: Path, speaker, answer: Answer, reply: Reply, question_wave) -> None:
    save_wav(out / "question.wav", question_wave, SAMPLE_RATE)
    if reply.wave is not None:
        save_wav(out / "reply.wav", reply.wave, reply.sample_rate)
    reply_tokens = reply.grid.tokens[:, -reply.steps:] if reply.steps else reply.grid.tokens[:, :0]
    reply_figure(out / "reply.png", reply.wave, reply.sample_rate, reply_tokens,
                 [s.name for s in speaker.sampler.streams], speaker.vocab,
                 f"{answer.question!r} -> {reply.text!r}")


def keep_history(path: Path, new: list[dict]) -> list[dict]:
    """The run's metrics per step, `new` ones (a resumed run's) replacing any from step on."""
    old = json.loads(path.read_text("utf-8")) if path.is_file() else []
    first = new[0]["step"] if new else float("inf")
    history = [h for h in old if h["step"] < first] + [
        {k: v for k, v in h.items() if k != "time"} for h in new]
    atomic.write_json(path, history)
    return history


def _rate(result: dict) -> str:
    return (f"{result['accuracy']:.0%} [{result['low']:.0%}, {result['high']:.0%}] "
            f"of {result['n']}")


def write_report(out: Path, report: dict) -> None:
    atomic.write_json(out / "report.json", report)
    judge = report["judge"]
    lines = [f"# slm demo ({report['strategy']})", "",
             f"Held-out spoken questions, in voices never heard in training: {report['questions']}. "
             "A reply is right only if it is exactly the answer word (95% Wilson intervals).", "",
             f"- spoken replies the judge heard as the answer: {_rate(report['spoken'])}",
             f"- text answers: {_rate(report['answer'])}",
             f"- chance (always the most common answer): {report['chance']['majority']:.0%}",
             f"- judge CER of the speech against its own text: {report['speech_cer']:.3f} "
             f"(raw transcript: {report['raw_speech_cer']:.3f})",
             f"- the judge's own CER on held-out reference speech: "
             f"{judge['heldout_voices']['cer']:.3f} in new voices, "
             f"{judge['assistant_voice']['cer']:.3f} in the assistant's voice (never trained on), "
             f"where it hears {judge['assistant_voice']['exact']:.0%} of the reference answers "
             "exactly (the ceiling of the spoken accuracy)",
             "", "| question | voice | expected | text answer | judge heard | right | "
             "steps / ms to first audio |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['question']} | {r['voice']} | {r['expected']} | {r['text_answer']} | "
              f"{r['heard']} | {'yes' if r['spoken_correct'] else 'no'} | "
              f"{r['steps_to_first_audio']} / {r['ms_to_first_audio'] or 0:.0f} |"
              for r in report["results"]]
    lines += ["", "The first question and its reply: `question.wav`, `reply.wav`, `reply.png`."]
    atomic.write_text(out / "report.md", "\n".join(lines) + "\n")


def run_demo(out: str | Path, config_path: str, overrides: list[str], questions: int = 10,
             max_steps: int = 96, judge_steps: int = JUDGE_STEPS) -> dict:
    out = Path(out).absolute()
    config = prepare(out, load_config(config_path, overrides))
    _say(f"training a tiny {config.strategy.name} model ({config.train.steps} steps; resumes)")
    trained = train_to_the_end(config).history
    if not trained:
        _say(f"the model in {out / 'model'} is already trained to step {config.train.steps}; reusing it")
    history = keep_history(out / HISTORY, trained)
    run_loss_figure(out / "loss.png", history, config.strategy.name)
    judge = load_or_train_judge(out, judge_steps)
    _say("asking held-out spoken questions")
    report = ask(out, questions, max_steps, judge)
    write_report(out, report)
    _say(f"done: {out / 'report.md'}, {out / 'reply.wav'}, {out / 'reply.png'}, {out / 'loss.png'}")
    return report
