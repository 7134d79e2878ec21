"""Ask a model held-out spoken questions and score its replies, text and speech alike.

The demo and the strategy ablation score replies the same way, here:
- `correct`: the text channel says exactly the expected word (`closed_world.answer_is_correct`);
- `heard`: what the judge transcribes from the spoken reply, snapped to the lexicon;
- `spoken_correct`: the judge heard the expected word in it (the answer is right *audibly*);
- `speech_cer`: the judge's transcript against the reply's own text channel, i.e. whether the
  model said what it wrote (the ASR-CER of speech against text that PSLM and Mini-Omni report).

A reply to a prompt of a new length compiles the sampler's prefill first, so every question is
asked twice and only the second reply is timed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from slm.data.closed_world import QA, answer_is_correct, normalize
from slm.data.corpus import load_manifest
from slm.errors import AudioError
from slm.eval.judge import Judge, edit_distance, text_key
from slm.reply import Reply, Speaker
from slm.sample import prompt_bucket
from slm.speech.audio import load_audio


@dataclass
class Answer:
    question: str
    voice: str
    kind: str  # "arithmetic" or "fact"
    expected: str
    text_answer: str
    correct: bool
    heard: str | None  # None without a judge or without speech
    spoken_correct: bool | None
    steps: int
    tokens: int  # tokens sampled: steps x streams
    steps_to_first_audio: int
    ms_to_first_audio: float | None
    seconds: float


def heldout_dialogues(corpus_dir: str | Path, limit: int | None = None) -> list[dict]:
    """The held-out dialogues (questions in voices training never heard), in corpus order."""
    path = Path(corpus_dir) / "heldout" / "dialogues.jsonl"
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()][:limit]


def ask_heldout(speaker: Speaker, corpus_dir: str | Path, questions: int | None = None,
                judge: Judge | None = None,
                on_answer: Callable[[Answer, Reply, np.ndarray], None] | None = None) -> list[Answer]:
    """Greedy-or-sampled replies to the first `questions` held-out dialogues, scored."""
    corpus_dir = Path(corpus_dir)
    utterances = {u["id"]: u for u in load_manifest(corpus_dir / "heldout" / "utterances.jsonl")}
    rate = speaker.tokenizers.units.sample_rate
    answers, compiled = [], set()
    for i, dialogue in enumerate(heldout_dialogues(corpus_dir, questions)):
        question = utterances[dialogue["question_id"]]
        wave = load_audio(corpus_dir / question["audio"], rate)
        heard_question = speaker.hear(wave, rate)
        # Sampling compiles once per prompt bucket, so the first question of each bucket is
        # asked twice and the second, steady-state reply is the one timed and scored (same
        # key: the same reply).
        prompt = speaker.strategy.prompt([heard_question], speaker.vocab)
        bucket = prompt_bucket(prompt.tokens.shape[-1])
        if bucket not in compiled:
            speaker.reply([heard_question], jax.random.key(i))
            compiled.add(bucket)
        reply = speaker.reply([heard_question], jax.random.key(i))
        answers.append(_score(dialogue, question["voice"], reply, len(speaker.sampler.streams), judge))
        if on_answer:
            on_answer(answers[-1], reply, wave)
    return answers


def _score(dialogue: dict, voice: str, reply: Reply, streams: int, judge: Judge | None) -> Answer:
    qa = QA(dialogue["question"], dialogue["answer"], dialogue["kind"])
    heard = None
    if judge is not None and reply.wave is not None and reply.wave.size:
        try:
            heard = judge.transcribe(reply.wave, reply.sample_rate)
        except AudioError:  # a few milliseconds of sound (an untrained model's): nothing heard
            heard = ""
    return Answer(question=qa.question, voice=voice, kind=qa.kind, expected=qa.answer,
                  text_answer=reply.text, correct=answer_is_correct(reply.text, qa), heard=heard,
                  spoken_correct=None if judge is None else
                  heard is not None and qa.answer in normalize(heard),
                  steps=reply.steps, tokens=reply.steps * streams,
                  steps_to_first_audio=reply.steps_to_first_audio,
                  ms_to_first_audio=None if reply.seconds_to_first_audio is None
                  else 1000 * reply.seconds_to_first_audio, seconds=reply.seconds)


def summarize(answers: list[Answer]) -> dict:
    """Accuracy, speech quality and latency over a list of scored answers.

    Latencies are medians over replies that spoke (one slow outlier should not decide a
    strategy's latency); decode tokens/s is total tokens over total sampling time."""
    spoke = [a for a in answers if a.steps_to_first_audio >= 0]
    judged = [a for a in answers if a.spoken_correct is not None]
    summary = {
        "questions": len(answers),
        "answer_accuracy": float(np.mean([a.correct for a in answers])) if answers else 0.0,
        "accuracy_by_kind": {kind: float(np.mean([a.correct for a in answers if a.kind == kind]))
                             for kind in sorted({a.kind for a in answers})},
        "spoke": len(spoke),
        "steps_to_first_audio": float(np.median([a.steps_to_first_audio for a in spoke]))
        if spoke else None,
        "ms_to_first_audio": float(np.median([a.ms_to_first_audio for a in spoke]))
        if spoke else None,
        "decode_tokens_per_s": sum(a.tokens for a in answers) / max(sum(a.seconds for a in answers),
                                                                      1e-9),
    }
    if judged:
        summary["spoken_accuracy"] = float(np.mean([a.spoken_correct for a in judged]))
        summary["speech_cer"] = _corpus_cer([(a.heard or "", a.text_answer) for a in judged])
    return summary


def _corpus_cer(pairs: list[tuple[str, str]]) -> float:
    """Total character edits over total reference characters; a silent reply counts as all
    deletions, so not speaking cannot look good."""
    edits = sum(edit_distance(text_key(h), text_key(r)) for h, r in pairs)
    return edits / max(sum(len(text_key(r)) for _, r in pairs), 1)


def answers_to_json(answers: list[Answer]) -> list[dict]:
    return [asdict(a) for a in answers]
