"""Interleaved (SpiRit-LM): one stream of text pieces and phonetic units, switched at words.

`<bos> [Speech] u u u [Text] t t [Speech] u u <eos>`: a `[Text]`/`[Speech]` marker stands only
where the modality changes, so adjacent segments of one modality read back as one. A spoken
dialogue reply is written, then spoken: `[Speech] {question units} [Text] {answer} [Speech]
{answer units} <eos>`. Switch
points are sampled per example at word boundaries, with units cut at the word times, so the
model learns that a word may continue in either modality.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from slm.config import StreamConfig
from slm.errors import ConfigError
from slm.strategies.base import register_strategy, run, stream_specs
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.types import Grid, Segment
from slm.vocab import Vocab

MARKERS = {"text": "[Text]", "speech": "[Speech]"}


@dataclasses.dataclass(frozen=True)
class InterleavedOptions:
    force_modality: str = ""  # "" lets the model switch modality; "text" or "speech" forces it


class Interleaved:
    """`force="text"` or `"speech"` bans the other modality when sampling (SpiRit-LM's forced
    output modality); `None` lets the model switch with markers."""

    name = "interleaved"
    frame_aligned = False

    def __init__(self, force: str | None = None):
        if force not in (None, "text", "speech"):
            raise ConfigError(f"force={force!r}; choose None, 'text' or 'speech'")
        self.force = force

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        return [StreamConfig("tokens", ["specials", "text", "units"], "temporal")]

    def _tokens(self, segments: Sequence[Segment], vocab: Vocab) -> tuple[list[int], list[bool], str | None]:
        """Token ids, whether each belongs to an assistant segment, and the final modality."""
        parts, assistant, modality = [vocab.bos_id], [False], None
        for segment in segments:
            for run_modality, run_ids in _runs_of(segment):
                ids = [] if run_modality == modality else [vocab.special(MARKERS[run_modality])]
                ids += list(run_ids)
                parts += ids
                assistant += [segment.role == "assistant"] * len(ids)
                modality = run_modality
        return parts, assistant, modality

    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """Pretraining weights every token; with an assistant turn only the reply (and <eos>)."""
        parts, assistant, _ = self._tokens(segments, vocab)
        grid = run(np.array(parts + [vocab.eos_id], np.int32), 1.0)
        if any(assistant):
            grid.weights[0] = np.array(assistant + [True], np.float32)
        return grid

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """The segments so far, to be continued; a forced modality gets its marker up front."""
        parts, _, modality = self._tokens(segments, vocab)
        if self.force and modality != self.force:
            parts.append(vocab.special(MARKERS[self.force]))
        return run(np.array(parts, np.int32), 1.0)

    def policy(self, vocab: Vocab) -> DecodePolicy:
        """Markers switch the allowed vocabulary; `<eos>` ends the reply."""
        (stream,) = stream_specs(self, vocab)
        text, units, eos = list(vocab.ids("text")), list(vocab.ids("units")), vocab.eos_id
        to_text, to_speech = vocab.special("[Text]"), vocab.special("[Speech]")
        rule = RuleBuilder(stream).phase("done", [vocab.pad_id], final=True)
        if self.force:
            allowed = text if self.force == "text" else units
            rule.phase(self.force, allowed + [eos]).on(self.force, [eos], "done")
            return DecodePolicy((rule.build(start=self.force, fill=vocab.pad_id),))
        rule.phase("free", text + units + [to_text, to_speech, eos])
        rule.phase("text", text + [to_speech, eos]).phase("speech", units + [to_text, eos])
        rule.on("free", text + [to_text], "text").on("free", units + [to_speech], "speech")
        rule.on("text", [to_speech], "speech").on("speech", [to_text], "text")
        for phase in ("free", "text", "speech"):
            rule.on(phase, [eos], "done")
        return DecodePolicy((rule.build(start="free", fill=vocab.pad_id),))

    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """Segments by modality run; there are no roles on the grid, so all read as "user"."""
        return _runs(grid.tokens[0].tolist(), None, "user", vocab)

    def continuation(self, prompt: Grid, reply: Grid, vocab: Vocab) -> list[Segment]:
        """The reply's runs: it continues in the modality the prompt ended in."""
        markers = {vocab.special(m): modality for modality, m in MARKERS.items()}
        modality = next((markers[t] for t in reversed(prompt.tokens[0].tolist()) if t in markers), None)
        return _runs(reply.tokens[0].tolist(), modality, "assistant", vocab)


def _runs_of(segment: Segment) -> list[tuple[str, np.ndarray]]:
    """The modality runs one segment contributes. An assistant's spoken reply that carries its
    text is written first and then spoken (`[Text] seven [Speech] u u u`), so the reply has a
    text channel to check and its speech is conditioned on it, as SpiRit-LM's text-to-speech
    continuation is; anything else is its own modality alone."""
    if segment.role == "assistant" and segment.modality == "speech" and segment.text is not None:
        return [("text", segment.text), ("speech", segment.units)]
    return [(segment.modality, segment.text if segment.modality == "text" else segment.units)]


def _runs(tokens: list[int], modality: str | None, role: str, vocab: Vocab) -> list[Segment]:
    markers = {vocab.special(m): name for name, m in MARKERS.items()}
    skip = {vocab.bos_id, vocab.eos_id, vocab.pad_id}
    runs: list[tuple[str, list[int]]] = [(modality, [])] if modality else []
    for token in tokens:
        if token in markers:
            runs.append((markers[token], []))
        elif token not in skip and runs:
            runs[-1][1].append(token)
    return [_segment(name, ids, role) for name, ids in runs if ids]

def _segment(modality: str, ids: list[int], role: str) -> Segment:
    ids = np.array(ids, np.int32)
    if modality == "text":
        return Segment(role, "text", text=ids)
    return Segment(role, "speech", units=ids)


def interleave(speech: Segment, rng: np.random.Generator, unit_rate: float,
               switch_prob: float = 0.3) -> list[Segment]:
    """Cut one aligned utterance into alternating text/speech runs of whole words.

    `speech` must carry text, word_ends, units and word_times. A word's units span from its
    start to the next word's start (the first word from 0, the last to the end), so no unit
    frame is lost or repeated.
    """
    words = len(speech.word_ends)
    starts = np.round(speech.word_times[:, 0] * unit_rate).astype(int)
    bounds = np.concatenate([[0], starts[1:], [len(speech.units)]]).clip(0, len(speech.units))
    text_bounds = np.concatenate([[0], speech.word_ends])
    modality = "speech" if rng.random() < 0.5 else "text"
    segments, first = [], 0
    for w in range(1, words + 1):
        if w < words and rng.random() >= switch_prob:
            continue
        if modality == "text":
            segment = Segment("user", "text", text=speech.text[text_bounds[first]:text_bounds[w]])
        else:
            segment = Segment("user", "speech", units=speech.units[bounds[first]:bounds[w]])
        if (segment.text if modality == "text" else segment.units).size:  # words may share a frame
            segments.append(segment)
            modality, first = ("speech" if modality == "text" else "text"), w
    return segments


register_strategy("interleaved",
                  lambda options, vocab: Interleaved(force=options.force_modality or None),
                  InterleavedOptions)
