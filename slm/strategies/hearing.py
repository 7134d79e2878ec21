"""How the user's speech reaches the model: as phonetic unit ids, or as speech-encoder frames.

`units` (SpeechGPT, SpiRit-LM, PSLM): the user turn is a run of unit ids, de-duplicated for
strategies that are not frame aligned. `features` (Qwen-Audio, LLaMA-Omni, SpiralAI): the user
turn is the encoder's continuous frames, here the unit tokenizer's own encoder frames before
k-means, so the two inputs differ only in the quantization.

Features enter the grid as placeholders, the way LLaVA-style speech LLMs do it: the user
turn's `units` become one `<|audio|>` id per grid step, every strategy lays them out exactly
as it lays out units (no strategy knows the difference), and `Hearing.attach` then puts each
placeholder step's `frames_per_step` frames (the projector's window) beside the grid, in
order. The model adds the projected frames to the placeholder's embedding at those steps
(`SpeechLM` sums its inputs per step anyway), so one code path serves both: a grid without
features is a grid of units.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from slm.errors import ConfigError, DataError
from slm.speech.runs import dedup_units
from slm.types import Grid, Segment
from slm.vocab import Vocab

AUDIO_TOKEN = "<|audio|>"  # a grid step whose input is projected speech frames
USER_INPUTS = ("units", "features")
FRAMES = ("states", "log_mel")  # what features are (slm.data.tokenizers.Heard)


def unit_view(ids, vocab: Vocab) -> np.ndarray:
    """The ids of a unit run as a strategy checks them: a heard turn's placeholders stand for
    units (and are laid out where the units would be)."""
    ids = np.asarray(ids)
    if AUDIO_TOKEN not in vocab.specials:
        return ids
    return ids[ids != vocab.special(AUDIO_TOKEN)]


def frame_groups(frames_fd: np.ndarray, per_step: int) -> tuple[np.ndarray, np.ndarray]:
    """`[F, D]` frames -> `[ceil(F / per_step), per_step, D]` and the mask of real frames (the
    last group is zero-padded: its real frames still carry the end of the utterance)."""
    steps = -(-len(frames_fd) // per_step)
    padded = np.zeros((steps * per_step, frames_fd.shape[1]), np.float32)
    padded[:len(frames_fd)] = frames_fd
    mask = np.arange(steps * per_step) < len(frames_fd)
    return padded.reshape(steps, per_step, -1), mask.reshape(steps, per_step)


@dataclasses.dataclass(frozen=True)
class Hearing:
    user_input: str = "units"  # "units" | "features"
    dedup: bool = False  # units: one id per run of equal units
    frames_per_step: int = 1  # features: encoder frames behind one grid step
    feature_dim: int = 0  # features: the frames' width (model.speech_input.dim)
    frames: str = "states"  # features: the unit encoder's "states", or "log_mel" for a model
    #                         that runs its own encoder (model.speech_input.encoder)

    def __post_init__(self):
        if self.user_input not in USER_INPUTS:
            raise ConfigError(f"strategy.user_input={self.user_input!r}; choose one of "
                              f"{', '.join(USER_INPUTS)}")
        if self.frames_per_step < 1:
            raise ConfigError(f"frames_per_step={self.frames_per_step}: must be >= 1")
        if self.frames not in FRAMES:
            raise ConfigError(f"hearing frames={self.frames!r}; choose one of {', '.join(FRAMES)}")
        if self.features and self.feature_dim < 1:
            raise ConfigError("hearing features needs their width: set model.speech_input.dim "
                              "(training takes it from the tokenized data's cached frames)")

    @property
    def features(self) -> bool:
        return self.user_input == "features"

    @property
    def frame_shape(self) -> tuple[int, int] | None:
        """(W, D) of every grid's features, None when the user is heard as units."""
        return (self.frames_per_step, self.feature_dim) if self.features else None

    def heard(self, segment: Segment, vocab: Vocab) -> Segment:
        """A user speech segment as the model hears it. `segment.units` are flat unit ids, one
        per unit frame; with features, `segment.features` are the encoder frames."""
        if self.features:
            if segment.features is None:
                raise DataError("strategy.user_input=features, but this spoken user turn has no "
                                "encoder frames: tokenize with tokenizers.cache_features=true "
                                "(or listen with TokenizerSet.listen, which computes them)")
            frames = np.asarray(segment.features, np.float32)
            if frames.ndim != 2 or frames.shape[1] != self.feature_dim:
                raise DataError(f"user speech features of shape {frames.shape}; the model hears "
                                f"[frames, {self.feature_dim}] (model.speech_input.dim): "
                                f"tokenize with the unit tokenizer the model was trained with, "
                                f"keeping tokenizers.features={self.frames}")
            steps = -(-len(frames) // self.frames_per_step)
            return Segment(segment.role, "speech", text=segment.text, word_ends=segment.word_ends,
                           units=np.full(steps, vocab.special(AUDIO_TOKEN), np.int32),
                           codes=segment.codes, features=frames)
        if self.dedup and segment.units is not None:
            units = vocab.unit_id(dedup_units(vocab.local("units", segment.units))[0])
            return dataclasses.replace(segment, units=units, word_times=None, features=None)
        return dataclasses.replace(segment, features=None)

    def attach(self, grid: Grid, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """`grid` (laid out from `segments`) with each `<|audio|>` step's frames beside it."""
        if not self.features:
            return grid
        placeholder = vocab.special(AUDIO_TOKEN)
        steps = np.flatnonzero((grid.tokens == placeholder).any(axis=0))
        groups = [frame_groups(s.features, self.frames_per_step) for s in segments
                  if s.features is not None]
        if sum(len(g[0]) for g in groups) != len(steps):
            raise DataError(f"the strategy laid out {len(steps)} {AUDIO_TOKEN} steps for "
                            f"{sum(len(g[0]) for g in groups)} steps of user speech frames; a "
                            "strategy must lay out a heard user turn's units once, in order")
        grid = grid.with_features(self.frame_shape)
        if groups:
            grid.features[steps] = np.concatenate([g[0] for g in groups])
            grid.feature_mask[steps] = np.concatenate([g[1] for g in groups])
        return grid
