"""The judge: a CTC recognizer that scores generated speech by transcribing it.

Every strategy is scored the same way: its spoken reply (or a codec resynthesis) is transcribed
by this judge and compared with the intended text by character error rate (CER). The judge is
trained only on the corpus's train split and validated on the held-out split, whose voices it
never heard, so its own CER there bounds how much of a strategy's CER is the judge's fault.
The recognizer itself is `slm.speech.recognizer`.

Decoding is greedy CTC. The world is closed (`closed_world.LEXICON`), so a hypothesis word
is snapped to the nearest lexicon word, but only within a distance cap (a third of its
letters, at least one edit): a far-off word stays as heard, and wrong. `transcribe` returns
the snapped text, `transcribe_raw` the raw one, and both CERs are reported.

The judge never hears the assistant's voice in training (`ASSISTANT_VOICE` utterances are left
out), so it grades every model's speech as a listener who never met that speaker; its CER on
held-out reference speech in that voice is reported beside its CER on held-out voices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slm.data.closed_world import LEXICON, normalize
from slm.data.corpus import ASSISTANT_VOICE, PAD_S, load_manifest
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


def snap_cap(word: str) -> int:
    """The most edits a heard word may be from a lexicon word and still snap to it."""
    return max(1, len(word) // 3)


def snap_word(word: str) -> str:
    if word in LEXICON:
        return word
    nearest = min(_LEXICON, key=lambda v: edit_distance(word, v))
    return nearest if edit_distance(word, nearest) <= snap_cap(word) else word


def snap(text: str) -> str:
    """Each word replaced by its nearest lexicon word if that is within `snap_cap` edits."""
    return " ".join(snap_word(w) for w in normalize(text))


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
    """Train on the train split's sentences and questions in every voice but the assistant's,
    and on one word cut out of each of them (`word_clips`)."""
    waves, texts, records = _split(corpus_dir, "train", limit,
                                   lambda r: r["voice"] != ASSISTANT_VOICE, with_records=True)
    clips, words = word_clips(waves, records, np.random.default_rng(seed))
    waves, texts = waves + clips, texts + words
    judge = Judge(train_recognizer(waves, texts, steps, seed, cfg, log_every), cfg)
    if out_dir is not None:
        judge.save(out_dir)
    return judge


WORD_MARGIN_S = 0.04  # kept around a cut-out word, so its edges are not clipped


def word_clips(waves: list[np.ndarray], records: list[dict],
               rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """One word of each utterance, cut out at its aligned times and padded with the corpus's
    silence. Spoken replies are often a single word; a recognizer that heard only sentences
    (which all start alike) hears "the ..." in every lone word (CER 1.5 on lone answers)."""
    rate, clips, words = FEATURES.sample_rate, [], []
    pad = np.zeros(round(PAD_S * rate), np.float32)
    for wave, record in zip(waves, records):
        word, start, end = record["words"][rng.integers(len(record["words"]))]
        lo = max(0, round((start - WORD_MARGIN_S) * rate))
        hi = min(wave.size, round((end + WORD_MARGIN_S) * rate))
        clips.append(np.concatenate([pad, wave[lo:hi], pad]))
        words.append(text_key(word))
    return clips, words


def _split(corpus_dir: str | Path, split: str, limit: int | None = None, keep=lambda r: True,
           with_records: bool = False):
    """(waves, texts) of a split's utterances that `keep` accepts, in manifest order (and
    their records, `with_records`)."""
    root = Path(corpus_dir)
    records = [r for r in load_manifest(root / split / "utterances.jsonl") if keep(r)][:limit]
    waves = [load_audio(root / r["audio"], FEATURES.sample_rate) for r in records]
    texts = [text_key(r["text"]) for r in records]
    return (waves, texts, records) if with_records else (waves, texts)


def corpus_rates(hypotheses: list[str], references: list[str]) -> tuple[float, float]:
    """Corpus-level CER and WER: total edits over total reference characters / words."""
    def rate(split):
        edits = sum(edit_distance(split(text_key(h)), split(text_key(r)))
                    for h, r in zip(hypotheses, references))
        return edits / max(sum(len(split(text_key(r))) for r in references), 1)

    return rate(lambda t: t), rate(lambda t: t.split())


def judge_split(judge: Judge, corpus_dir: str | Path, split: str = "heldout",
                limit: int | None = None, keep=lambda r: True) -> dict:
    """Corpus-level CER/WER of the judge on a split's utterances that `keep` accepts, snapped
    and raw (`raw_cer`, `raw_wer`), and how many it hears exactly (`exact`: on the assistant's
    lone answers, the most a spoken reply can score)."""
    waves, texts = _split(corpus_dir, split, limit, keep)
    raw = judge.transcribe_raw_batch(waves, FEATURES.sample_rate)
    snapped = [snap(h) for h in raw]
    cer_, wer_ = corpus_rates(snapped, texts)
    raw_cer, raw_wer = corpus_rates(raw, texts)
    exact = sum(h == t for h, t in zip(snapped, texts)) / max(len(texts), 1)
    return {"cer": cer_, "wer": wer_, "raw_cer": raw_cer, "raw_wer": raw_wer, "exact": exact,
            "utterances": len(texts)}


def judge_report(judge: Judge, corpus_dir: str | Path, limit: int | None = 400) -> dict:
    """The judge's own error on held-out reference speech, printed with every result: in the
    held-out voices (questions and sentences) and in the assistant's voice (held-out answers),
    which it grades but never heard in training."""
    return {"heldout_voices": judge_split(judge, corpus_dir, "heldout", limit,
                                          lambda r: r["voice"] != ASSISTANT_VOICE),
            "assistant_voice": judge_split(judge, corpus_dir, "heldout", limit,
                                           lambda r: r["voice"] == ASSISTANT_VOICE)}
