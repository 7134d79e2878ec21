"""The judge: a CTC recognizer that scores generated speech by transcribing it.

Every strategy is scored the same way: its spoken reply (or a codec resynthesis) is transcribed
by this judge and compared with the intended text by character error rate (CER). The judge is
trained only on the corpus's train split and validated on the held-out split, whose voices it
never heard, so its own CER there bounds how much of a strategy's CER is the judge's fault.
The recognizer itself is `slm.speech.recognizer`.

Decoding is greedy CTC. The world is closed (`closed_world.LEXICON`, ~141 words), so each
hypothesis word is also snapped to the nearest lexicon word by edit distance; `transcribe` returns
the snapped text, `transcribe_raw` the raw one, and both CERs are reported.
"""

from __future__ import annotations

from pathlib import Path

from slm.data.closed_world import LEXICON, normalize
from slm.data.corpus import load_manifest
from slm.speech.audio import load_audio
from slm.speech.recognizer import FEATURES, Recognizer, RecognizerConfig, train_recognizer

NAME = "judge"  # judge.json + judge.npz in the judge's directory


def text_key(text: str) -> str:
    """Normalized text: lower-case words without punctuation, single spaces."""
    return " ".join(normalize(text))


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def cer(hypothesis: str, reference: str) -> float:
    """Character edit distance / reference length, on normalized text (can exceed 1)."""
    hyp, ref = text_key(hypothesis), text_key(reference)
    return edit_distance(hyp, ref) / max(len(ref), 1)


def wer(hypothesis: str, reference: str) -> float:
    hyp, ref = normalize(hypothesis), normalize(reference)
    return edit_distance(hyp, ref) / max(len(ref), 1)


_LEXICON = sorted(LEXICON)  # sorted so ties always snap to the same word


def snap(text: str) -> str:
    """Each word replaced by its nearest lexicon word (the closed world is known)."""
    return " ".join(w if w in LEXICON else min(_LEXICON, key=lambda v: edit_distance(w, v))
                    for w in normalize(text))


class Judge(Recognizer):
    """A trained recognizer whose `transcribe(wave, sample_rate)` gives snapped text."""

    def transcribe(self, wave, sample_rate: int) -> str:
        return snap(self.transcribe_raw(wave, sample_rate))

    def save(self, out_dir: str | Path) -> None:
        super().save(out_dir, NAME)

    @classmethod
    def load(cls, out_dir: str | Path) -> Judge:
        return super().load(out_dir, NAME)


def train_judge(corpus_dir: str | Path, out_dir: str | Path | None = None, steps: int = 1000,
                seed: int = 0, cfg: RecognizerConfig = RecognizerConfig(), limit: int | None = None,
                log_every: int = 0) -> Judge:
    """Train on every utterance of the train split (sentences, questions and answers)."""
    waves, texts = _split(corpus_dir, "train", limit)
    judge = Judge(train_recognizer(waves, texts, steps, seed, cfg, log_every), cfg)
    if out_dir is not None:
        judge.save(out_dir)
    return judge


def _split(corpus_dir: str | Path, split: str, limit: int | None = None):
    """(waves, texts) of a split's utterances, in manifest order."""
    root = Path(corpus_dir)
    records = load_manifest(root / split / "utterances.jsonl")[:limit]
    waves = [load_audio(root / r["audio"], FEATURES.sample_rate) for r in records]
    return waves, [text_key(r["text"]) for r in records]


def corpus_rates(hypotheses: list[str], references: list[str]) -> tuple[float, float]:
    """Corpus-level CER and WER: total edits over total reference characters / words."""
    def rate(split):
        edits = sum(edit_distance(split(text_key(h)), split(text_key(r)))
                    for h, r in zip(hypotheses, references))
        return edits / max(sum(len(split(text_key(r))) for r in references), 1)

    return rate(lambda t: t), rate(lambda t: t.split())


def judge_split(judge: Judge, corpus_dir: str | Path, split: str = "heldout",
                limit: int | None = None) -> dict:
    """Corpus-level CER/WER of the judge on a split, snapped and raw (`raw_cer`, `raw_wer`)."""
    waves, texts = _split(corpus_dir, split, limit)
    raw = judge.transcribe_raw_batch(waves, FEATURES.sample_rate)
    cer_, wer_ = corpus_rates([snap(h) for h in raw], texts)
    raw_cer, raw_wer = corpus_rates(raw, texts)
    return {"cer": cer_, "wer": wer_, "raw_cer": raw_cer, "raw_wer": raw_wer,
            "utterances": len(texts)}
