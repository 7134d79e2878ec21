"""Token records -> segments, per training task.

Records keep tokenizer-local ids (see slm.data.tokenize); here they are moved into the flat
vocabulary and cut into the segments a task needs. A task names the records it reads and the
turns it makes of them, so the same shards feed pretraining mixtures (text-only, speech-only,
interleaved, ASR, TTS) and spoken dialogues for every strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from slm.errors import ConfigError
from slm.strategies.hearing import Hearing
from slm.strategies.interleaved import interleave
from slm.types import Segment
from slm.vocab import Vocab


def speech_segment(utt: dict, vocab: Vocab, role: str, hearing: Hearing | None = None) -> Segment:
    """All views of a spoken utterance in flat ids; a user turn as `hearing` hears it (units
    de-duplicated, or encoder frames cached by `slm tokenize` behind placeholders)."""
    codes = np.stack([vocab.codebook_id(q, utt["codes"][q]) for q in range(vocab.num_codebooks)])
    segment = Segment(role, "speech", text=vocab.text_id(utt["text_ids"]),
                      word_ends=utt["word_token_ends"], units=vocab.unit_id(utt["units"]),
                      codes=codes, word_times=utt["word_times"], features=utt.get("features"))
    return hearing.heard(segment, vocab) if hearing else dataclasses.replace(segment, features=None)


def text_segment(record: dict, vocab: Vocab, role: str) -> Segment:
    return Segment(role, "text", text=vocab.text_id(record["text_ids"]),
                   word_ends=record.get("word_token_ends"))


def _as_text(segment: Segment, role: str) -> Segment:
    return Segment(role, "text", text=segment.text, word_ends=segment.word_ends)


def _only_speech(segment: Segment, role: str) -> Segment:
    return Segment(role, "speech", units=segment.units, codes=segment.codes,
                   features=segment.features)


# (record, vocab, per-example rng, how the user's speech is heard) -> segments
Task = Callable[[dict, Vocab, np.random.Generator, Hearing], list[Segment]]


def _dialogue(r, vocab, rng, hearing):
    return [speech_segment(r["question"], vocab, "user", hearing),
            speech_segment(r["answer"], vocab, "assistant")]


def _asr(r, vocab, rng, hearing):
    """Speech and its transcript, with the word times a timed transcript is written with
    (hearing de-duplicated units drops them from the speech)."""
    speech = speech_segment(r, vocab, "user", hearing)
    transcript = dataclasses.replace(_as_text(speech, "assistant"), word_times=r["word_times"])
    return [_only_speech(speech, "user"), transcript]


def _tts(r, vocab, rng, hearing):
    speech = speech_segment(r, vocab, "assistant")
    return [_as_text(speech, "user"), _only_speech(speech, "assistant")]


def _language_model_input(hearing: Hearing) -> Hearing:
    """Speech the model continues rather than answers is always units: they are its targets."""
    return dataclasses.replace(hearing, user_input="units")


def _speech(r, vocab, rng, hearing):
    return [_only_speech(speech_segment(r, vocab, "user", _language_model_input(hearing)), "user")]


def _interleaved(r, vocab, rng, hearing):
    runs = interleave(speech_segment(r, vocab, "user"), rng, r["unit_rate"])
    hear = _language_model_input(hearing)
    return [hear.heard(s, vocab) if s.modality == "speech" else s for s in runs]


def _text(r, vocab, rng, hearing):
    return [text_segment(r, vocab, "user")]


def _text_dialogue(r, vocab, rng, hearing):
    """A written question answered in writing: where text-only facts are asked."""
    return [text_segment(r["question"], vocab, "user"), text_segment(r["answer"], vocab, "assistant")]


TASKS: dict[str, tuple[str, Task]] = {  # task -> (records it reads, segments it makes)
    "dialogue": ("dialogues", _dialogue),
    "asr": ("sentences", _asr),
    "tts": ("sentences", _tts),
    "speech": ("sentences", _speech),
    "interleaved": ("sentences", _interleaved),
    "text": ("text", _text),
    "text_dialogue": ("text-dialogues", _text_dialogue),
}
UNSPLIT_RECORDS = ("text", "text-dialogues")  # written records have no train/held-out split


def task(name: str) -> tuple[str, Task]:
    if name not in TASKS:
        raise ConfigError(f"data task {name!r} is unknown; choose from {', '.join(TASKS)}")
    return TASKS[name]


def split_for(task_name: str, split: str) -> str:
    """Shard split a task reads: `train-dialogues`, `heldout-sentences`, `text`, ..."""
    records = task(task_name)[0]
    return records if records in UNSPLIT_RECORDS else f"{split}-{records}"
