"""What every strategy shares: segments in, a `[K, T]` token grid with loss weights out.

A `Segment` is one turn of one modality with the token views a strategy may use (text pieces
with word boundaries; phonetic units; codec codes; word times), all as flat vocabulary ids.
A strategy's `layout` turns a list of segments into a `Grid`, and `unlayout` reads segments
back from a grid; the model, trainer and sampler only ever see grids.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from slm.config import ModelConfig, StreamConfig
from slm.model.heads import StreamSpec
from slm.model.lm import build_streams
from slm.strategies.policy import DecodePolicy
from slm.vocab import Vocab

ROLES = ("user", "assistant")
MODALITIES = ("text", "speech")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a, b)


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    role: str  # "user" | "assistant"
    modality: str  # "text" | "speech"
    text: np.ndarray | None = None  # int32 [N] text ids (for speech: the transcript)
    word_ends: np.ndarray | None = None  # int32 [W]: word w is text[word_ends[w-1]:word_ends[w]]
    units: np.ndarray | None = None  # int32 [U] phonetic unit ids, one per unit frame
    codes: np.ndarray | None = None  # int32 [Q, F] codec ids, one column per codec frame
    word_times: np.ndarray | None = None  # float32 [W, 2] start/end seconds of each word

    def __post_init__(self):
        if self.role not in ROLES or self.modality not in MODALITIES:
            raise ValueError(f"segment role/modality must be in {ROLES}/{MODALITIES}, "
                             f"got {self.role!r}/{self.modality!r}")

    def same(self, other: "Segment") -> bool:
        """Equality of every field, arrays compared by value."""
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not _same(a, b):
                    return False
            elif a != b:
                return False
        return True


@dataclasses.dataclass
class Grid:
    """`tokens[k, t]` and the loss weight of predicting it; K streams over T steps."""

    tokens: np.ndarray  # int32 [K, T]
    weights: np.ndarray  # float32 [K, T]

    def __post_init__(self):
        if self.tokens.shape != self.weights.shape or self.tokens.ndim != 2:
            raise ValueError(f"grid tokens {self.tokens.shape} and weights {self.weights.shape} "
                             "must both be [K, T]")

    @classmethod
    def concat(cls, grids: Sequence["Grid"]) -> "Grid":
        return cls(np.concatenate([g.tokens for g in grids], axis=1).astype(np.int32),
                   np.concatenate([g.weights for g in grids], axis=1).astype(np.float32))

    def as_batch(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "weights": self.weights}


class Strategy(Protocol):
    """A way of laying segments out; see the strategy table in the design notes.

    Loss weights: when the segments hold an assistant turn, only the assistant's tokens (and
    the markers that end them) are weighted; otherwise (pretraining) every token is.
    """

    name: str
    frame_aligned: bool  # needs frame-level units aligned with codec frames (no de-duplication)

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        """The model's input/output streams (ranges each may hold, temporal or depth head)."""

    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """The whole example: what the model trains on."""

    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """Segments back from a grid (a laid-out example, or a prompt plus a sampled reply)."""

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """The grid the sampler prefills: the user turns, up to where the reply starts.

        For every example, `layout(segments)` begins with `prompt(user segments)`.
        """

    def policy(self, vocab: Vocab) -> DecodePolicy:
        """Per-stream phase machines that steer the shared sampler."""


def assistant_turn(strategy: Strategy, prompt: Grid, reply: Grid, vocab: Vocab) -> list[Segment]:
    """The segments a sampled reply adds to its prompt.

    Strategies with role markers read them off the whole grid; a role-free one (interleaved)
    provides `continuation(prompt, reply, vocab)` to say where the reply begins.
    """
    continuation = getattr(strategy, "continuation", None)
    if continuation is not None:
        return continuation(prompt, reply, vocab)
    return [s for s in strategy.unlayout(Grid.concat([prompt, reply]), vocab) if s.role == "assistant"]


def stream_specs(strategy: Strategy, vocab: Vocab) -> tuple[StreamSpec, ...]:
    """The strategy's streams resolved to vocabulary spans (what heads and rules index)."""
    return build_streams(ModelConfig(streams=strategy.streams(vocab)), vocab)


def run(ids: np.ndarray, weight: float) -> Grid:
    """A one-stream grid of `ids`, every step weighted `weight`."""
    ids = np.asarray(ids, np.int32).reshape(1, -1)
    return Grid(ids, np.full(ids.shape, weight, np.float32))
