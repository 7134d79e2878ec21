"""Ask a model held-out questions under every test condition and score its replies strictly.

Conditions (`CONDITIONS`), all in voices no training example used:
- `voices`, `phrasings`, `transfer`: the corpus's spoken test sets (`closed_world.TEST_SETS`):
  training phrasings, held-out phrasings, and text-only facts asked by voice;
- `noise_20db` ... `stereo_44k`: the `voices` questions through `slm.eval.perturb`;
- `text`, `transfer_text`: the `voices` and `transfer` questions written instead of spoken
  (the modality gap is `text` minus `voices`);
- `silence`, `shuffled`: controls on the `voices` questions, which must score at chance.

Scoring, one rule for both channels (`closed_world.answer_is_correct`: exactly the answer word):
- `correct`: the text channel;
- `spoken_correct`: the judge's transcript of the spoken reply (snapped within a cap);
- `speech_cer` / `raw_speech_cer`: the judge's snapped / raw transcript against the reply's own
  text channel, i.e. whether the model said what it wrote.

Each question is listened to once (`TokenizerSet.listen`) and its tokens reused by every model;
replies are sampled in batches on device. Latency is measured apart (`time_replies`), one
question at a time, because a batch's time to first audio is not one reply's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from slm.data.closed_world import QA, TEST_SETS, answer_is_correct
from slm.data.corpus import load_manifest
from slm.data.tokenizers import TokenizerSet
from slm.eval import perturb
from slm.errors import SlmError
from slm.eval.judge import Judge, edit_distance, snap, text_key
from slm.eval.stats import accuracy, chance
from slm.reply import Reply, Speaker
from slm.sample import prompt_bucket
from slm.speech.audio import load_audio
from slm.types import Segment

SAMPLE_RATE = 16_000  # question waves are kept at the corpus's rate

SPOKEN_SETS = tuple(TEST_SETS)
TEXT_CONDITIONS = {"text": "voices", "transfer_text": "transfer"}  # condition -> its spoken set
CONTROLS = ("silence", "shuffled")
PERTURBED = tuple(perturb.PERTURBATIONS)  # of the `voices` questions
CONDITIONS = (*SPOKEN_SETS, *PERTURBED, *TEXT_CONDITIONS, *CONTROLS)


@dataclasses.dataclass
class Question:
    id: str
    condition: str
    question: str
    answer: str
    kind: str  # "arithmetic" or "fact"
    voice: str  # "" for a written question
    wave: np.ndarray | None  # at SAMPLE_RATE; None for a written question

    @property
    def qa(self) -> QA:
        return QA(self.question, self.answer, self.kind)


@dataclasses.dataclass
class Answer:
    id: str
    condition: str
    question: str
    voice: str
    kind: str
    expected: str
    text_answer: str
    correct: bool
    heard: str | None  # snapped transcript; None without a judge or without speech
    raw_heard: str | None
    spoken_correct: bool | None
    steps: int
    tokens: int  # tokens sampled: steps x streams
    steps_to_first_audio: int
    ms_to_first_audio: float | None  # only for replies timed alone
    seconds: float


def test_set(corpus_dir: str | Path, name: str, limit: int | None = None) -> list[Question]:
    """The first `limit` held-out dialogues of one spoken test set, with their audio."""
    corpus_dir = Path(corpus_dir)
    utterances = {u["id"]: u for u in load_manifest(corpus_dir / "heldout" / "utterances.jsonl")}
    lines = (corpus_dir / "heldout" / "dialogues.jsonl").read_text("utf-8").splitlines()
    dialogues = [d for d in map(json.loads, lines) if d.get("set") == name][:limit]
    questions = []
    for d in dialogues:
        spoken = utterances[d["question_id"]]
        questions.append(Question(d["id"], name, d["question"], d["answer"], d["kind"],
                                  spoken["voice"], load_audio(corpus_dir / spoken["audio"], SAMPLE_RATE)))
    return questions


def build_conditions(corpus_dir: str | Path, per_set: int, conditions: Sequence[str] = CONDITIONS,
                     seed: int = 0) -> dict[str, list[Question]]:
    """Every requested condition's questions, `per_set` of each, derived deterministically."""
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown test conditions {unknown}; choose from {', '.join(CONDITIONS)}")
    spoken = {name: test_set(corpus_dir, name, per_set) for name in SPOKEN_SETS
              if name in conditions or name in _sources(conditions)}
    out = {}
    for number, name in enumerate(conditions):
        rng = np.random.default_rng([seed, number])
        if name in SPOKEN_SETS:
            out[name] = spoken[name]
        elif name in perturb.PERTURBATIONS:
            damage = perturb.PERTURBATIONS[name]
            out[name] = [_as(q, name, wave=damage(q.wave, SAMPLE_RATE, rng)) for q in spoken["voices"]]
        elif name in TEXT_CONDITIONS:
            out[name] = [_as(q, name, wave=None, voice="") for q in spoken[TEXT_CONDITIONS[name]]]
        elif name == "silence":
            out[name] = [_as(q, name, wave=perturb.silenced(q.wave, rng)) for q in spoken["voices"]]
        else:  # shuffled: each question hears another one's audio
            asked = spoken["voices"]
            order = perturb.shuffled_order(len(asked), rng)
            out[name] = [_as(q, name, wave=asked[j].wave) for q, j in zip(asked, order)]
    return out


def _sources(conditions: Sequence[str]) -> set[str]:
    return {TEXT_CONDITIONS.get(c, "voices") for c in conditions if c not in SPOKEN_SETS}


def _as(q: Question, condition: str, **changes) -> Question:
    return dataclasses.replace(q, condition=condition, **changes)


Listened = list[tuple[np.ndarray, np.ndarray] | None]


def listen(tokenizers: TokenizerSet, questions: list[Question]) -> Listened:
    """Units and codes of every spoken question (None for written ones), computed once."""
    return [None if q.wave is None else tokenizers.listen(q.wave, SAMPLE_RATE) for q in questions]


def _turn(speaker: Speaker, question: Question, listened) -> Segment:
    return speaker.read(question.question) if listened is None else speaker.spoken_turn(listened)


def reads_text(speaker: Speaker, question: Question) -> bool:
    """Whether the strategy can lay out a written user turn (coarse_to_fine's frames cannot)."""
    try:
        speaker.strategy.prompt([speaker.read(question.question)], speaker.vocab)
    except SlmError:
        return False
    return True


def ask(speaker: Speaker, questions: list[Question], listened: Listened, judge: Judge | None,
        batch_size: int = 32, seed: int = 0) -> list[Answer]:
    """Replies to every question, sampled `batch_size` at a time, scored."""
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        turns = [[_turn(speaker, q, h)] for q, h in zip(batch, listened[start:start + batch_size])]
        replies = speaker.replies(turns, jax.random.key(seed + start))
        heard = _transcribe(judge, replies)
        answers += [_score(q, r, h, len(speaker.sampler.streams), timed=False)
                    for q, r, h in zip(batch, replies, heard)]
    return answers


def time_replies(speaker: Speaker, questions: list[Question], listened: Listened,
                 judge: Judge | None, on_answer: Callable[[Answer, Reply, Question], None] | None = None,
                 seed: int = 0) -> list[Answer]:
    """Replies one question at a time, timed: sampling compiles once per prompt bucket, so
    the first question of each bucket is asked twice and the second, steady-state reply is
    the one timed and scored (same key: the same reply)."""
    answers, compiled = [], set()
    for i, (question, heard_question) in enumerate(zip(questions, listened)):
        turn = [_turn(speaker, question, heard_question)]
        bucket = prompt_bucket(speaker.strategy.prompt(turn, speaker.vocab).tokens.shape[-1])
        if bucket not in compiled:
            speaker.reply(turn, jax.random.key(seed + i))
            compiled.add(bucket)
        reply = speaker.reply(turn, jax.random.key(seed + i))
        answers.append(_score(question, reply, _transcribe(judge, [reply])[0],
                              len(speaker.sampler.streams), timed=True))
        if on_answer:
            on_answer(answers[-1], reply, question)
    return answers


def _transcribe(judge: Judge | None, replies: list[Reply]) -> list[str | None]:
    """Raw judge transcripts of the spoken replies (see `transcribe_waves`); None without a
    judge."""
    if judge is None:
        return [None] * len(replies)
    return transcribe_waves(judge, [r.wave for r in replies], replies[0].sample_rate)


def transcribe_waves(judge: Judge, waves: list[np.ndarray | None], sample_rate: int) -> list[str]:
    """Raw judge transcripts of spoken replies: "" when a reply did not speak or made too
    little sound to hear (so it counts as a wrong spoken answer)."""
    spoke = [i for i, w in enumerate(waves) if w is not None and w.size >= 1024]
    raw = judge.transcribe_raw_batch([waves[i] for i in spoke], sample_rate) if spoke else []
    heard = dict(zip(spoke, raw))
    return [heard.get(i, "") for i in range(len(waves))]


def _score(q: Question, reply: Reply, raw_heard: str | None, streams: int, timed: bool) -> Answer:
    heard = None if raw_heard is None else snap(raw_heard)
    return Answer(id=q.id, condition=q.condition, question=q.question, voice=q.voice, kind=q.kind,
                  expected=q.answer, text_answer=reply.text,
                  correct=answer_is_correct(reply.text, q.qa), heard=heard, raw_heard=raw_heard,
                  spoken_correct=None if heard is None else answer_is_correct(heard, q.qa),
                  steps=reply.steps, tokens=reply.steps * streams,
                  steps_to_first_audio=reply.steps_to_first_audio,
                  ms_to_first_audio=None if not timed or reply.seconds_to_first_audio is None
                  else 1000 * reply.seconds_to_first_audio, seconds=reply.seconds)


def summarize(answers: list[Answer]) -> dict:
    """Accuracies with 95% intervals, the answer distribution's chance levels, speech quality
    and latency over one condition's answers. Latencies are medians over replies that spoke;
    decode tokens/s is total tokens over total sampling time."""
    spoke = [a for a in answers if a.steps_to_first_audio >= 0]
    timed = [a.ms_to_first_audio for a in spoke if a.ms_to_first_audio is not None]
    judged = [a for a in answers if a.spoken_correct is not None]
    summary = {
        "questions": len(answers),
        "answer": accuracy(a.correct for a in answers),
        "chance": chance(a.expected for a in answers),
        "by_kind": {kind: accuracy(a.correct for a in answers if a.kind == kind)
                    for kind in sorted({a.kind for a in answers})},
        "spoke": len(spoke),
        "steps_to_first_audio": float(np.median([a.steps_to_first_audio for a in spoke]))
        if spoke else None,
        "ms_to_first_audio": float(np.median(timed)) if timed else None,
        "decode_tokens_per_s": sum(a.tokens for a in answers) / max(sum(a.seconds for a in answers),
                                                                      1e-9),
    }
    if judged:
        summary["spoken"] = accuracy(a.spoken_correct for a in judged)
        summary["speech_cer"] = _corpus_cer([(a.heard or "", a.text_answer) for a in judged])
        summary["raw_speech_cer"] = _corpus_cer([(a.raw_heard or "", a.text_answer) for a in judged])
    return summary


def _corpus_cer(pairs: list[tuple[str, str]]) -> float:
    """Total character edits over total reference characters; a silent reply counts as all
    deletions, so not speaking cannot look good."""
    edits = sum(edit_distance(text_key(h), text_key(r)) for h, r in pairs)
    return edits / max(sum(len(text_key(r)) for _, r in pairs), 1)


def answers_to_json(answers: list[Answer]) -> list[dict]:
    return [dataclasses.asdict(a) for a in answers]
