"""The pure types every layer shares: segments, token grids and stream specs (numpy, no jax).

A `Segment` is one turn of one modality with the token views a strategy may use (text pieces
with word boundaries; phonetic units; codec codes; word times), all as flat vocabulary ids.
A strategy lays segments out as a `Grid`; the model, trainer and sampler only ever see grids.
A `StreamSpec` is one of the grid's K streams resolved to the vocabulary spans it may hold:
the model sizes its heads by it, strategies build their decode rules over it. Living here,
below both, these types let strategies stay pure layouts that never load the model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from slm.config import ModelConfig
from slm.errors import ConfigError
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
    features: np.ndarray | None = None  # float32 [F, D] speech-encoder frames of a user turn
    #                                     heard as features (slm.strategies.hearing)

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
    """`tokens[k, t]` and the loss weight of predicting it; K streams over T steps.

    A grid whose user speech is heard as encoder frames also carries, per step, the
    `frames_per_step` frames behind it (zeros and an all-False mask at every other step).
    """

    tokens: np.ndarray  # int32 [K, T]
    weights: np.ndarray  # float32 [K, T]
    features: np.ndarray | None = None  # float32 [T, W, D]
    feature_mask: np.ndarray | None = None  # bool [T, W]: which frames are real

    def __post_init__(self):
        if self.tokens.shape != self.weights.shape or self.tokens.ndim != 2:
            raise ValueError(f"grid tokens {self.tokens.shape} and weights {self.weights.shape} "
                             "must both be [K, T]")
        if (self.features is None) != (self.feature_mask is None) or (
                self.features is not None and (
                    self.features.ndim != 3 or self.features.shape[:2] != self.feature_mask.shape
                    or self.features.shape[0] != self.tokens.shape[1])):
            raise ValueError(f"grid features {_shape(self.features)} and mask "
                             f"{_shape(self.feature_mask)} must be [T, W, D] and [T, W] with "
                             f"T = {self.tokens.shape[1]}, or both absent")

    @property
    def steps(self) -> int:
        return self.tokens.shape[1]

    def with_features(self, frames: tuple[int, int] | None) -> "Grid":
        """This grid with (zero) features of `frames` = (W, D) per step if it has none."""
        if frames is None or self.features is not None:
            return self
        return dataclasses.replace(self, features=np.zeros((self.steps, *frames), np.float32),
                                   feature_mask=np.zeros((self.steps, frames[0]), bool))

    @classmethod
    def concat(cls, grids: Sequence["Grid"]) -> "Grid":
        frames = next((g.features.shape[1:] for g in grids if g.features is not None), None)
        grids = [g.with_features(frames) for g in grids]
        joined = {key: None if frames is None else np.concatenate([getattr(g, key) for g in grids])
                  for key in ("features", "feature_mask")}
        return cls(np.concatenate([g.tokens for g in grids], axis=1).astype(np.int32),
                   np.concatenate([g.weights for g in grids], axis=1).astype(np.float32), **joined)

    def as_batch(self) -> dict[str, np.ndarray]:
        batch = {"tokens": self.tokens, "weights": self.weights}
        if self.features is not None:
            batch |= {"features": self.features, "feature_mask": self.feature_mask}
        return batch


def _shape(x: np.ndarray | None):
    return None if x is None else tuple(x.shape)


Spans = tuple[tuple[int, int], ...]  # [(start, stop), ...] of flat ids, ascending


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """A stream's head predicts over exactly its spans' ids, in a local index space 0..V_k-1
    (span after span), so a speech head never spends a row on text."""

    name: str
    spans: Spans
    head: str  # "temporal", "depth" or a plug-in head kind (slm.model.head_kinds)

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.spans)


def _spans(vocab: Vocab, range_names: list[str], where: str) -> Spans:
    """Vocabulary ranges -> merged ascending (start, stop) spans."""
    spans: list[list[int]] = []
    if len(set(range_names)) != len(range_names):
        raise ConfigError(f"{where}: a range is listed twice in {range_names}")
    for name in range_names:
        if not vocab.has_range(name):
            known = ", ".join(r.name for r in vocab.ranges)
            raise ConfigError(f"{where}: unknown vocabulary range '{name}'; known ranges: {known}")
    for r in sorted((vocab.range(n) for n in range_names), key=lambda r: r.start):
        if spans and spans[-1][1] == r.start:
            spans[-1][1] = r.stop
        else:
            spans.append([r.start, r.stop])
    return tuple((a, b) for a, b in spans)


def build_streams(cfg: ModelConfig, vocab: Vocab) -> tuple[StreamSpec, ...]:
    """`cfg.streams` resolved to vocabulary spans, checked (known ranges, unique names, heads)."""
    streams = []
    for i, s in enumerate(cfg.streams):
        if not isinstance(s.head, str) or not s.head:  # the model checks plug-in kinds
            raise ConfigError(f"model.streams[{i}].head={s.head!r}; choose 'temporal', 'depth' "
                              "or a registered head kind (slm.model.head_kinds)")
        streams.append(StreamSpec(s.name, _spans(vocab, s.ranges, f"model.streams[{i}].ranges"), s.head))
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        raise ConfigError(f"model.streams: stream names must be unique, got {names}")
    if not any(s.head == "temporal" for s in streams):
        raise ConfigError("model.streams: at least one stream needs head: temporal")
    return tuple(streams)
