"""Coarse-to-fine (AudioLM / UniAudio / Moshi): every step is one speech frame, coarse to fine.

Streams, one column per frame at the shared frame rate (units and codec both run at 50 Hz):
`text` (Moshi's inner monologue), `semantic` (the frame's phonetic unit) and `ac0..ac{Q-1}`
(codec codes, predicted in order by the depth decoder, conditioned on `semantic`). Codes are
delayed by `acoustic_delay` frames so a frame's codes are predicted after its unit and text
are already in context (Moshi's acoustic delay of 1).

One speech turn is a block: its frames, then `<eosp>` on every stream, delayed (`<pad>` fill):

    text      <text_epad> t0 t1 <text_pad> <text_epad> t2 <eosp> <text_pad>
    semantic  u0 u1 u2 u3 u4 u5 <eosp> <pad>
    ac_q      <pad> c0 c1 c2 c3 c4 c5 <eosp>

Inner monologue: every word is `<text_epad>` then its pieces, the pieces starting at the word's
start frame (so `<text_epad>` sits one frame before); where that would overlap the previous
word's pieces (or a word starts at frame 0), the word shifts right to the first free frame, so
text order is kept and text lags speech by a few frames at most. The `<text_epad>` on every word
is what lets `unlayout` find word boundaries without piece strings. If the last words run past
the speech, the block grows to hold them (semantic/acoustic `<pad>`, weight 0) and the text's
`<eosp>` follows its last piece. The text stream needs its own `<eosp>` because the sampler
emits only fill from a stream in a final phase, so the monologue cannot be final while it talks.

`user_codes=False` leaves a user turn's acoustic streams `<pad>`: the model hears the user only
through the semantic stream, de-duplicated as the single-stream strategies read it (nothing
needs the user's units on the codec's timeline then). Moshi hears the user's codes too, but it learned from millions of
hours; a tiny model trained on 18 voices latched onto the codes' voice and answered only half
of the held-out questions, against 95% for strategies that hear units alone.

A reply block is preceded by one boundary column (`<sosp>` on `semantic`), which belongs to the
prompt. User turns carry only their speech: their text stream is `<text_pad>` to the `<eosp>`, as in
Moshi, where only the model's own speech has a monologue, so a live prompt (speech, no
transcript) looks exactly like training. To pretrain with a monologue, pass the utterance as an
assistant segment (its prompt is then the boundary column alone).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from slm.config import StreamConfig
from slm.errors import ConfigError, DataError
from slm.strategies.base import register_strategy, stream_specs
from slm.strategies.delays import delay
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.types import Grid, Segment
from slm.vocab import Vocab

MAX_SKEW = 2  # unit and code frame counts may differ by this much (resampling/edge effects)

Block = tuple[np.ndarray, np.ndarray, bool]  # tokens [K, L], valid cells [K, L], is a reply


@dataclasses.dataclass(frozen=True)
class CoarseToFineOptions:
    acoustic_delay: int = 1  # frames the codebooks lag their unit and text
    user_codes: bool = True  # hear the user's codec codes too (Moshi), or its units only


class CoarseToFine:
    """`num_codebooks` acoustic streams delayed by `acoustic_delay` frames; `frame_rate` (Hz)
    turns word times into frames."""

    name = "coarse_to_fine"
    frame_aligned = True
    depth_cond_stream = "semantic"  # model.depth.cond_stream for configs of this strategy

    def __init__(self, num_codebooks: int, acoustic_delay: int = 1, frame_rate: float = 50.0,
                 user_codes: bool = True):
        if num_codebooks < 1 or acoustic_delay < 0 or frame_rate <= 0:
            raise ConfigError(f"need num_codebooks >= 1, acoustic_delay >= 0, frame_rate > 0; got "
                             f"{num_codebooks}, {acoustic_delay}, {frame_rate}")
        self.num_codebooks, self.acoustic_delay, self.frame_rate = num_codebooks, acoustic_delay, frame_rate
        self.delays = [0, 0] + [acoustic_delay] * num_codebooks  # per stream, in stream order
        self.user_codes = user_codes
        self.frame_aligned = user_codes  # a user heard through units alone reads them de-duplicated

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        """Specials ride in every stream, which also gives the depth streams equal sizes."""
        acoustic = [StreamConfig(f"ac{q}", ["specials", f"ac{q}"], "depth")
                    for q in range(self.num_codebooks)]
        return [StreamConfig("text", ["specials", "text"], "temporal"),
                StreamConfig("semantic", ["specials", "units"], "temporal"), *acoustic]

    def steps_to_first_audio(self) -> int:
        """Reply steps sampled before the one that completes frame 0's codes. The `<sosp>`
        column is prefilled with the prompt, so only the acoustic delay counts."""
        return self.acoustic_delay

    # -- layout -------------------------------------------------------------------------------
    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """Blocks in order, a boundary before each reply; a trailing user turn also gets one,
        so `layout` always begins with `prompt` of its leading user turns."""
        blocks = self._blocks(segments, vocab)
        if not segments or segments[-1].role == "user":
            blocks.append(self._boundary(vocab))
        return _grid(blocks)

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """The turns so far and the boundary column: the reply's frame 0 is sampled next."""
        return _grid(self._blocks(segments, vocab) + [self._boundary(vocab)])

    def _blocks(self, segments: Sequence[Segment], vocab: Vocab) -> list[Block]:
        blocks = []
        for segment in segments:
            if segment.role == "assistant":
                blocks.append(self._boundary(vocab))
            blocks.append(self._block(segment, vocab))
        return blocks

    def _boundary(self, vocab: Vocab) -> Block:
        tokens = np.array([vocab.special("<text_pad>"), vocab.special("<sosp>")]
                          + [vocab.pad_id] * self.num_codebooks, np.int32)[:, None]
        valid = np.array([True, True] + [False] * self.num_codebooks)[:, None]
        return tokens, valid, False

    def _block(self, segment: Segment, vocab: Vocab) -> Block:
        """One speech turn: undelayed frames + `<eosp>` column, then the acoustic delay."""
        heard_codes = segment.role == "assistant" or self.user_codes
        if segment.modality != "speech" or segment.units is None or \
                (heard_codes and segment.codes is None):
            raise DataError("coarse_to_fine lays out speech segments with units and codes; got a "
                             f"{segment.modality} segment (units={segment.units is not None}, "
                             f"codes={segment.codes is not None})")
        if heard_codes and segment.features is not None:
            raise ConfigError("coarse_to_fine hears the user's codec codes in step with their "
                              "units (strategy.user_codes: true), which frames heard as features "
                              "do not have: with strategy.user_input=features set "
                              "strategy.options.user_codes=false")
        if heard_codes:
            codes = np.asarray(segment.codes, np.int32)
            if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
                raise DataError(f"codes must be [{self.num_codebooks}, F], got {codes.shape}")
            for q in range(self.num_codebooks):
                vocab.check_ids(codes[q], [f"ac{q}"], f"codebook {q} of a {segment.role} segment")
            n = codes.shape[1]
            units = self._aligned_units(segment, n, vocab)
        else:
            units = np.asarray(segment.units, np.int32)
            n = len(units)
        pad, eosp, text_pad = vocab.pad_id, vocab.special("<eosp>"), vocab.special("<text_pad>")
        text = self._monologue(segment, vocab) if segment.role == "assistant" else np.zeros(0, np.int32)
        width = max(n, len(text)) + 1
        grid = np.full((2 + self.num_codebooks, width), pad, np.int32)
        grid[0] = text_pad
        grid[0, :len(text)], grid[0, width - 1] = text, eosp
        grid[1, :n], grid[1:, n] = units, eosp
        if heard_codes:
            grid[2:, :n] = codes
        else:  # the user is heard through their units alone; the acoustic rows stay <pad>
            grid[2:, n] = pad
        tokens = delay(grid, self.delays, pad)
        tokens[0, width:] = text_pad  # the text's own fill: what the sampler emits after its <eosp>
        d = self.acoustic_delay
        valid = np.zeros(tokens.shape, bool)
        valid[0, :width], valid[1, :n + 1], valid[2:, d:d + n + 1] = True, True, True
        return tokens, valid, segment.role == "assistant"

    def _aligned_units(self, segment: Segment, n: int, vocab: Vocab) -> np.ndarray:
        """Units cut or edge-padded to the `n` code frames: the codes are what gets decoded to
        audio, so they set the clock; a frame or two of skew is rounding at the edges."""
        units = np.asarray(segment.units, np.int32)
        vocab.check_ids(units, ["units"], f"units of a {segment.role} segment")
        if abs(len(units) - n) > MAX_SKEW or (n and not len(units)):
            raise DataError(f"{len(units)} unit frames vs {n} code frames: more than {MAX_SKEW} apart; "
                             "units and codec must share the frame rate")
        return np.concatenate([units[:n], np.repeat(units[-1:], n - min(n, len(units)))])

    def _monologue(self, segment: Segment, vocab: Vocab) -> np.ndarray:
        """The text row from frame 0: each word `<text_epad>` + pieces, `<text_pad>` between.
        Without word times, words are packed from frame 0 (an unaligned monologue)."""
        if segment.text is None:
            return np.zeros(0, np.int32)
        text = np.asarray(segment.text, np.int32)
        vocab.check_ids(text, ["text"], "assistant text")
        ends = np.asarray([len(text)] if segment.word_ends is None else segment.word_ends, np.int64)
        if len(ends) and (ends[-1] != len(text) or np.any(np.diff(ends, prepend=0) < 0)):
            raise DataError(f"word_ends {ends.tolist()} must be non-decreasing and end at {len(text)}")
        starts = np.zeros(len(ends), np.int64)
        if segment.word_times is not None:
            if len(segment.word_times) != len(ends):
                raise DataError(f"{len(segment.word_times)} word times for {len(ends)} words")
            starts = np.round(np.asarray(segment.word_times)[:, 0] * self.frame_rate).astype(np.int64)
        row, text_pad = [], vocab.special("<text_pad>")
        for word, start in zip(np.split(text, ends[:-1]), starts):
            at = max(int(start) - 1, len(row))  # the <text_epad> column
            row += [text_pad] * (at - len(row)) + [vocab.special("<text_epad>")] + word.tolist()
        return np.array(row, np.int32)

    # -- unlayout -----------------------------------------------------------------------------
    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """Blocks are read off the semantic row: units up to `<eosp>`, `<pad>` until the next
        block, `<sosp>` marking a reply. Word times come back frame-quantized: start = the frame
        after the word's `<text_epad>` (the true start unless the word was shifted), end = the
        next word's start (the last word: the end of speech); user turns come back without text.
        A cut-off reply (no `<eosp>` yet) gives the frames it has."""
        tokens, d = grid.tokens, self.acoustic_delay
        semantic, steps = tokens[1], tokens.shape[1]
        sosp, eosp, pad = vocab.special("<sosp>"), vocab.special("<eosp>"), vocab.pad_id
        segments, role, c = [], "user", 0
        while c < steps:
            if semantic[c] in (sosp, pad):
                role = "assistant" if semantic[c] == sosp else role
                c += 1
                continue
            end = c
            while end < steps and semantic[end] != eosp:
                end += 1
            after = end + 1
            while after < steps and semantic[after] == pad:
                after += 1
            n = min(end - c, max(0, steps - c - d))
            units, codes = semantic[c:end].astype(np.int32), tokens[2:, c + d:c + d + n].astype(np.int32)
            if role == "assistant":
                text, word_ends, word_times = self._words(tokens[0, c:after], end - c, vocab)
                segments.append(Segment("assistant", "speech", text=text, word_ends=word_ends,
                                        units=units, codes=codes, word_times=word_times))
            else:
                segments.append(Segment("user", "speech", units=units, codes=codes))
            role, c = "user", after
        return segments

    def _words(self, row: np.ndarray, frames: int, vocab: Vocab):
        """Text pieces, word ends and frame-quantized word times from one block's text row."""
        epad, text = vocab.special("<text_epad>"), vocab.range("text")
        words: list[tuple[int, list[int]]] = []
        for i, token in enumerate(row.tolist()):
            if token == epad:
                words.append((i + 1, []))
            elif token in text:
                if not words:  # a sampled word without its <text_epad>
                    words.append((i, []))
                words[-1][1].append(token)
        if not words:
            return None, None, None
        starts = np.array([s for s, _ in words], np.float64)
        ends = np.maximum(np.append(starts[1:], frames), starts)
        pieces = np.array([p for _, word in words for p in word], np.int32)
        word_ends = np.cumsum([len(word) for _, word in words]).astype(np.int32)
        return pieces, word_ends, (np.stack([starts, ends], 1) / self.frame_rate).astype(np.float32)

    # -- decoding -----------------------------------------------------------------------------
    def policy(self, vocab: Vocab) -> DecodePolicy:
        """Every stream speaks until its `<eosp>`, then emits its fill (text: `<text_pad>`,
        others: `<pad>`); the text may pad or start words at any frame. The acoustic streams
        wait `acoustic_delay` steps (emitting `<pad>`), mirroring the layout."""
        specs = stream_specs(self, vocab)
        eosp, pad = vocab.special("<eosp>"), vocab.pad_id
        text_pad, epad = vocab.special("<text_pad>"), vocab.special("<text_epad>")
        text = (RuleBuilder(specs[0]).phase("monologue", [*vocab.ids("text"), text_pad, epad, eosp])
                .phase("done", [text_pad], final=True).on("monologue", [eosp], "done"))
        rules = [text.build(start="monologue", fill=text_pad)]
        for spec, ids, wait in [(specs[1], vocab.ids("units"), 0)] + [
                (specs[2 + q], vocab.ids(f"ac{q}"), self.acoustic_delay) for q in range(self.num_codebooks)]:
            rule = RuleBuilder(spec).phase("speech", [*ids, eosp]).phase("done", [pad], final=True)
            rules.append(rule.on("speech", [eosp], "done").build(start="speech", fill=pad, delay=wait))
        return DecodePolicy(tuple(rules))


def _grid(blocks: list[Block]) -> Grid:
    """Concatenated blocks; with a reply present only its valid cells are weighted, otherwise
    (pretraining) every valid cell is; delay fill never is."""
    any_reply = any(reply for _, _, reply in blocks)
    tokens = np.concatenate([t for t, _, _ in blocks], axis=1)
    weights = np.concatenate([v & (reply or not any_reply) for _, v, reply in blocks], axis=1)
    return Grid(tokens.astype(np.int32), weights.astype(np.float32))


register_strategy("coarse_to_fine",
                  lambda options, vocab: CoarseToFine(vocab.num_codebooks,
                                                      acoustic_delay=options.acoustic_delay,
                                                      user_codes=options.user_codes),
                  CoarseToFineOptions)
