"""A test-only strategy for the acceptance tests: each word is written, then spoken.

    <bos> [Human] {user text} <eoh> [Assistant]
          w1 <sosp> {w1's units} <eosp> w2 <sosp> {w2's units} <eosp> ... <eos>

One stream. The reply alternates a word's text pieces with the unit frames that speak it, so
the first audio comes after one word rather than after the whole answer (chain of modality)
and without parallel streams. A word's units run from its start frame to the next word's
(the first word from frame 0, the last to the end of the speech), so no frame is lost.

It exists to show that a new strategy needs nothing outside its own module: it is built
only from the public pieces of `slm.strategies.base` and `slm.strategies.policy` (plus the
`Segment`, `Grid`, `StreamConfig` and `Vocab` types every strategy names), and the unchanged model, trainer and
sampler train on and decode it. Nothing in `slm/` knows about it.

User turns are text (their `text` view); assistant turns are speech with `text`, `word_ends`,
`units` and `word_times` (used for the cut only; `unlayout` gives back text, word ends and
units). Turns alternate user, assistant; user tokens are weighted 0, the reply's 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from slm.config import StreamConfig
from slm.strategies.base import run, stream_specs
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.types import Grid, Segment
from slm.vocab import Vocab


class WordByWord:
    name = "word_by_word"
    frame_aligned = False  # units are cut at word times, not aligned with codec frames

    def __init__(self, unit_rate: float = 50.0):
        self.unit_rate = unit_rate

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        return [StreamConfig("tokens", ["specials", "text", "units"], "temporal")]

    # --- layout -----------------------------------------------------------------------------

    def _user(self, user: Segment, vocab: Vocab) -> list[int]:
        if user.role != "user" or user.text is None:
            raise ValueError(f"{self.name}: expected a user turn with text, got a {user.role} "
                             f"{user.modality} turn (text={user.text is not None})")
        vocab.check_ids(user.text, ["text"], f"{self.name}: user text")
        sp = vocab.special
        return [sp("[Human]"), *np.asarray(user.text).tolist(), sp("<eoh>"), sp("[Assistant]")]

    def _words(self, reply: Segment, vocab: Vocab) -> list[tuple[np.ndarray, np.ndarray]]:
        """(text pieces, unit frames) of each word of a spoken reply."""
        if reply.role != "assistant" or reply.modality != "speech" or any(
                v is None for v in (reply.text, reply.word_ends, reply.units, reply.word_times)):
            raise ValueError(f"{self.name}: an assistant turn needs speech with text, word_ends, "
                             "units and word_times")
        vocab.check_ids(reply.text, ["text"], f"{self.name}: assistant text")
        vocab.check_ids(reply.units, ["units"], f"{self.name}: assistant units")
        units = np.asarray(reply.units, np.int32)
        starts = np.round(np.asarray(reply.word_times)[:, 0] * self.unit_rate).astype(int)
        bounds = np.concatenate([[0], starts[1:], [len(units)]]).clip(0, len(units))
        pieces = np.split(np.asarray(reply.text, np.int32), np.asarray(reply.word_ends)[:-1])
        return [(p, units[a:b]) for p, a, b in zip(pieces, bounds[:-1], bounds[1:])]

    def _reply(self, reply: Segment, vocab: Vocab) -> list[int]:
        sosp, eosp = vocab.special("<sosp>"), vocab.special("<eosp>")
        out: list[int] = []
        for pieces, units in self._words(reply, vocab):
            out += [*pieces.tolist(), sosp, *units.tolist(), eosp]
        return out + [vocab.eos_id]

    def _grid(self, segments: Sequence[Segment], vocab: Vocab, complete: bool) -> Grid:
        if not segments or len(segments) % 2 != (0 if complete else 1):
            what = "a layout ends with a reply" if complete else "a prompt ends with a user turn"
            raise ValueError(f"{self.name}: {len(segments)} turns; {what}")
        parts = [run([vocab.bos_id], 0.0)]
        for i, segment in enumerate(segments):
            if i % 2 == 0:
                parts.append(run(self._user(segment, vocab), 0.0))
            else:
                parts.append(run(self._reply(segment, vocab), 1.0))
        return Grid.concat(parts)

    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        return self._grid(segments, vocab, complete=True)

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        return self._grid(segments, vocab, complete=False)

    # --- decoding and reading back ----------------------------------------------------------

    def policy(self, vocab: Vocab) -> DecodePolicy:
        """word (text, `<sosp>`) -> speech (units, `<eosp>`) -> between (text: next word, or
        `<eos>`: done)."""
        (stream,) = stream_specs(self, vocab)
        text, units = list(vocab.ids("text")), list(vocab.ids("units"))
        sosp, eosp, eos = vocab.special("<sosp>"), vocab.special("<eosp>"), vocab.eos_id
        rule = (RuleBuilder(stream)
                .phase("word", text + [sosp]).on("word", [sosp], "speech")
                .phase("speech", units + [eosp]).on("speech", [eosp], "between")
                .phase("between", text + [eos]).on("between", text, "word")
                .on("between", [eos], "done")
                .phase("done", [vocab.pad_id], final=True))
        return DecodePolicy((rule.build(start="word", fill=vocab.pad_id),))

    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """Turns back; a reply cut short gives the words it holds so far."""
        sp = vocab.special
        human, assistant = sp("[Human]"), sp("[Assistant]")
        sosp, eosp = sp("<sosp>"), sp("<eosp>")
        turns: list[tuple[str, list[int]]] = []
        for token in grid.tokens[0].tolist():
            if token in (human, assistant):
                turns.append(("user" if token == human else "assistant", []))
            elif turns:
                turns[-1][1].append(token)
        segments = []
        for role, body in turns:
            if role == "user":
                segments.append(Segment("user", "text", text=_in(body, vocab.range("text"))))
                continue
            text, units, ends, speaking = [], [], [], False
            for token in body:
                if token in (sosp, eosp):
                    speaking = token == sosp
                    if speaking:
                        ends.append(len(text))
                elif token in vocab.range("text") and not speaking:
                    text.append(token)
                elif token in vocab.range("units") and speaking:
                    units.append(token)
            segments.append(Segment("assistant", "speech", text=np.array(text, np.int32),
                                    word_ends=np.array(ends, np.int32),
                                    units=np.array(units, np.int32)))
        return segments


def _in(tokens: list[int], token_range) -> np.ndarray:
    return np.array([t for t in tokens if t in token_range], np.int32)
