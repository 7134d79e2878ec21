"""Parallel (PSLM, Mini-Omni): the answer's text and its speech generated on the same steps.

K = 1 + S streams advance together and the model sums their embeddings per step. Stream 0
holds text; streams 1..S hold speech: one stream of phonetic units (`speech="units"`) or one
per codec codebook (`speech="codes"`, all on temporal heads). Unlike chain-of-modality, the
reply's speech does not wait for its text to finish, only for the stream delays: stream k
lags by `delays[k]` steps. The default `[0, 1, 2, ...]` is Mini-Omni's "audio layer i lags
text by i+1 steps". Text leads, so each speech token is predicted after the text it speaks
has begun, and codebook q of a frame comes after codebook q-1.

A spoken exchange `[user speech, assistant speech]`, units, default delays:

    text : <bos> [Human] t1    t2 <epad> <tpad> <tpad> [Assistant] a1    <epad> <tpad> <tpad> <tpad>
    units: <pad> <pad>   <pad> u1 u2     u3     <eosp> <pad>       <pad> u1     u2     u3     <eosp>
    (<epad> = <text_epad>, <tpad> = <text_pad>; the unit row lags by its delay of 1)

Each turn is a *block* that follows a role-marker column ([Human] or [Assistant] on the text
stream, `<pad>` on the speech streams). A block writes stream k as `delays[k]` fill steps,
then the stream's tokens and its end token (`<text_epad>` for text, `<eosp>` for speech),
then fill up to the block's end. The fill is `<text_pad>` on the text stream and `<pad>` on
the speech streams, the same ids the decode policy emits. A block ends at the step where its
last stream ends, which is where the sampler stops. Text usually ends first and pads while
the speech goes on. Then the block is `delays.delay`'s `[K, R + max(delays)]`. If the text
ends last, the block ends with the text instead of running on with fill that the sampler
would never produce.

The user's turn is written as the same kind of block: their transcript on the text stream
and their speech on the speech streams, with the same delays. We chose this layout for
three reasons:
- One writer and one reader serve both roles.
- The model reads the user's speech in the convention it writes its own: the same codebooks
  share a step.
- Like PSLM, the model gets the user's transcript beside their speech.
The prompt is `<bos>`, the user blocks and the `[Assistant]` column, so the reply starts at
the first step the sampler generates. A text-only turn (text in, speech out) leaves its
speech streams all `<pad>` with no `<eosp>`, and it reads back as a text segment.

Loss weights: marker columns and delay-fill steps get 0. A trained block weights stream k by
`stream_weights[k]` on every step from its delay on: its tokens, its end token and the
padding after it, because the model has to learn to pad. If an assistant turn is present,
only assistant blocks are trained. Otherwise (pretraining on plain utterances) every block
is.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from slm.config import StreamConfig
from slm.errors import ConfigError, DataError
from slm.strategies.base import register_strategy, stream_specs
from slm.strategies.hearing import unit_view
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.types import Grid, Segment
from slm.vocab import Vocab

MARKERS = {"user": "[Human]", "assistant": "[Assistant]"}


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
    speech: str = "units"  # "units" (one speech stream) or "codes" (one per codebook)
    delays: list[int] = dataclasses.field(default_factory=list)  # per stream; empty: default


class Parallel:
    """`speech="units"` (one speech stream) or `"codes"` (`num_codebooks` streams, by default
    all of the vocabulary's); `delays` and `stream_weights` give one entry per stream, text
    first (defaults `[0, 1, ..., S]` and 1.0)."""

    name = "parallel"
    frame_aligned = False

    def __init__(self, speech: str = "units", num_codebooks: int | None = None,
                 delays: Sequence[int] | None = None, stream_weights: Sequence[float] | None = None,
                 user_transcript: bool = False):
        if speech not in ("units", "codes"):
            raise ConfigError(f"speech={speech!r}; choose 'units' or 'codes'")
        if speech == "units" and num_codebooks is not None:
            raise ConfigError("num_codebooks applies to speech='codes' only")
        if num_codebooks is not None and num_codebooks < 1:
            raise ConfigError(f"num_codebooks must be >= 1, got {num_codebooks}")
        self.speech, self.num_codebooks = speech, num_codebooks
        # A spoken user turn is heard, not read (as Mini-Omni hears audio): its transcript goes
        # on the text stream only with `user_transcript`, e.g. when an ASR front end supplies it
        # at inference too. Training on transcripts the sampler never sees teaches the model to
        # read answers off text that is not there.
        self.user_transcript = user_transcript
        self.delays = None if delays is None else [int(d) for d in delays]
        self.stream_weights = None if stream_weights is None else [float(w) for w in stream_weights]
        if self.delays is not None and (len(self.delays) < 2 or min(self.delays) < 0):
            raise ConfigError(f"delays={self.delays}: one delay >= 0 per stream, text first")
        if speech == "units" or num_codebooks is not None:  # K is known without a vocabulary
            self._config(None)

    # --- streams ------------------------------------------------------------------

    def _names(self, vocab: Vocab | None) -> list[str]:
        """Each stream's content range, which is also the stream's name."""
        if self.speech == "units":
            return ["text", "units"]
        count = self.num_codebooks or vocab.num_codebooks
        if count < 1:
            raise ConfigError("speech='codes' needs a vocabulary with acoustic codebooks")
        return ["text"] + [f"ac{q}" for q in range(count)]

    def _config(self, vocab: Vocab | None) -> tuple[list[int], list[float]]:
        k = len(self._names(vocab))
        delays = list(range(k)) if self.delays is None else self.delays
        weights = [1.0] * k if self.stream_weights is None else self.stream_weights
        if len(delays) != k or len(weights) != k:
            raise ConfigError(f"parallel has {k} streams ({self._names(vocab)}) but got "
                             f"{len(delays)} delays and {len(weights)} stream weights")
        return delays, weights

    @staticmethod
    def _ends_fills(vocab: Vocab, k: int) -> tuple[list[int], list[int]]:
        """Each stream's end token and its fill (emitted while it waits and once it has ended)."""
        return ([vocab.special("<text_epad>")] + [vocab.special("<eosp>")] * (k - 1),
                [vocab.special("<text_pad>")] + [vocab.pad_id] * (k - 1))

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        return [StreamConfig(name, ["specials", name], "temporal") for name in self._names(vocab)]

    def steps_to_first_audio(self, vocab: Vocab | None = None) -> int:
        """Reply steps sampled before the one that completes the first speech frame: the largest
        speech delay (the only one with units). A codec frame needs all its codebooks before it
        can be decoded, which is what the sampler's `first_audio` measures. No `<sosp>` comes
        first, because the delay already gives the text its head start. `vocab` is needed
        only for `speech="codes"` with default delays and no `num_codebooks`."""
        if self.delays is None and self.speech == "codes" and self.num_codebooks is None and vocab is None:
            raise ConfigError("steps_to_first_audio: pass the vocabulary to count its codebooks")
        return max(self._config(vocab)[0][1:])

    # --- layout -------------------------------------------------------------------

    def _bodies(self, segment: Segment, vocab: Vocab) -> list[np.ndarray]:
        """Each stream's tokens in one turn with its end token; a text turn leaves the speech
        streams empty (no `<eosp>`)."""
        names = self._names(vocab)
        ends, _ = self._ends_fills(vocab, len(names))
        where = f"parallel layout, {segment.role} {segment.modality} segment"
        heard = segment.role == "user" and segment.modality == "speech" and not self.user_transcript
        text = np.zeros(0, np.int32) if segment.text is None or heard else segment.text
        if segment.modality == "text":
            speech = [None] * (len(names) - 1)
        elif self.speech == "units":
            if segment.units is None:
                raise DataError(f"{where}: speech='units' needs the segment's units")
            speech = [segment.units]
        else:
            codes = segment.codes
            if codes is None or codes.ndim != 2 or codes.shape[0] < len(names) - 1:
                raise DataError(f"{where}: speech='codes' needs codes of shape [>= {len(names) - 1}, F], "
                                 f"got {None if codes is None else codes.shape}")
            speech = list(codes[:len(names) - 1])  # the first S codebooks, e.g. of Mimi's 8
        bodies = []
        for name, ids, end in zip(names, [text, *speech], ends):
            if ids is None:
                bodies.append(np.zeros(0, np.int32))
            else:
                vocab.check_ids(unit_view(ids, vocab) if name == "units" else ids, [name], where)
                bodies.append(np.append(np.asarray(ids, np.int32), end).astype(np.int32))
        return bodies

    def _block(self, segment: Segment, vocab: Vocab, trained: bool) -> Grid:
        delays, weights = self._config(vocab)
        _, fills = self._ends_fills(vocab, len(delays))
        bodies = self._bodies(segment, vocab)
        steps = max(d + len(b) for d, b in zip(delays, bodies) if len(b))
        tokens = np.array(fills, np.int32)[:, None].repeat(steps, 1)
        for k, (d, body) in enumerate(zip(delays, bodies)):
            tokens[k, d:d + len(body)] = body
        started = np.arange(steps)[None, :] >= np.array(delays)[:, None]
        return Grid(tokens, np.where(started & trained, np.array(weights)[:, None], 0.0).astype(np.float32))

    def _column(self, token: int, vocab: Vocab) -> Grid:
        """One step with `token` on the text stream and `<pad>` on the speech streams; weight 0."""
        tokens = np.full((len(self._names(vocab)), 1), vocab.pad_id, np.int32)
        tokens[0, 0] = token
        return Grid(tokens, np.zeros(tokens.shape, np.float32))

    def _grid(self, segments: Sequence[Segment], vocab: Vocab, trained) -> list[Grid]:
        parts = [self._column(vocab.bos_id, vocab)]
        for segment in segments:
            parts.append(self._column(vocab.special(MARKERS[segment.role]), vocab))
            parts.append(self._block(segment, vocab, trained(segment)))
        return parts

    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        pretraining = not any(s.role == "assistant" for s in segments)
        return Grid.concat(self._grid(segments, vocab, lambda s: pretraining or s.role == "assistant"))

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """The turns so far (unweighted), then the `[Assistant]` column the reply follows."""
        parts = self._grid(segments, vocab, lambda s: False)
        return Grid.concat(parts + [self._column(vocab.special(MARKERS["assistant"]), vocab)])

    # --- decoding and reading back --------------------------------------------------

    def policy(self, vocab: Vocab) -> DecodePolicy:
        """Text: text ids until `<text_epad>`, then `<text_pad>` only. Speech stream k: waits
        `delays[k]` steps on `<pad>`, then speech ids of its range until `<eosp>`, then `<pad>`.
        The reply ends when every stream has ended (normally the last speech stream's `<eosp>`)."""
        specs, names = stream_specs(self, vocab), self._names(vocab)
        delays, _ = self._config(vocab)
        (epad, *eosp), (text_pad, *pads) = self._ends_fills(vocab, len(names))
        rules = [RuleBuilder(specs[0]).phase("text", [*vocab.ids("text"), epad])
                 .phase("padded", [text_pad], final=True).on("text", [epad], "padded")
                 .build(start="text", fill=text_pad, delay=delays[0])]
        for k in range(1, len(names)):
            rules.append(RuleBuilder(specs[k]).phase("speech", [*vocab.ids(names[k]), eosp[k - 1]])
                         .phase("done", [pads[k - 1]], final=True).on("speech", [eosp[k - 1]], "done")
                         .build(start="speech", fill=pads[k - 1], delay=delays[k]))
        return DecodePolicy(tuple(rules))

    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """One segment per non-empty block, its role from the marker column before it. A reply
        cut short (no end tokens) reads up to the grid's end; codebooks are cut to a common length."""
        roles = {vocab.special(m): role for role, m in MARKERS.items()}
        starts = [t for t, token in enumerate(grid.tokens[0].tolist()) if token in roles]
        segments = []
        for start, stop in zip(starts, starts[1:] + [grid.tokens.shape[1]]):
            if stop > start + 1:
                role = roles[int(grid.tokens[0, start])]
                segments.append(self._read(role, grid.tokens[:, start + 1:stop], vocab))
        return segments

    def _read(self, role: str, block: np.ndarray, vocab: Vocab) -> Segment:
        names = self._names(vocab)
        delays, _ = self._config(vocab)
        ends, _ = self._ends_fills(vocab, len(names))
        bodies, ended = [], []
        for row, name, d, end in zip(block, names, delays, ends):
            row = row[d:]
            hits = np.flatnonzero(row == end)
            ended.append(hits.size > 0)
            row = row[:hits[0]] if hits.size else row
            r = vocab.range(name)
            bodies.append(row[(row >= r.start) & (row < r.stop)].astype(np.int32))
        text, speech = bodies[0], bodies[1:]
        if not any(ended[1:]) and not any(b.size for b in speech):
            return Segment(role, "text", text=text)
        if self.speech == "units":
            return Segment(role, "speech", text=text, units=speech[0])
        frames = min(b.size for b in speech)
        return Segment(role, "speech", text=text, codes=np.stack([b[:frames] for b in speech]))


def _from_options(options: ParallelOptions, vocab: Vocab) -> Parallel:
    codebooks = vocab.num_codebooks if options.speech == "codes" else None
    return Parallel(speech=options.speech, num_codebooks=codebooks, delays=options.delays or None)


register_strategy("parallel", _from_options, ParallelOptions)
