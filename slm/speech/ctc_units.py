"""Supervised phonetic units: k-means over the states of a CTC recognizer of the corpus.

Self-supervised encoders (HuBERT) make good units from thousands of hours of speech; minutes
of speech make poor ones. MFCC k-means units reach a purity of only 0.45 here, and a new
voice turns the same words into a new unit sequence, so a tiny model trained on them
misunderstood most questions in voices it had not heard. A recognizer trained to spell what was
said keeps *what* and drops *who*: the idea behind the supervised speech tokenizers of
CosyVoice and GLM-4-Voice (an ASR encoder, quantized). Its states, clustered, are units a
small LM can read in any voice.

The recognizer runs at 25 Hz; each state is repeated onto the 50 Hz timeline every tokenizer
here shares (coarse_to_fine needs units and codec frames to align), and strategies that read
de-duplicated units drop the repeats again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slm.speech.recognizer import FEATURES, Recognizer, RecognizerConfig, train_recognizer

NAME = "encoder"  # encoder.json + encoder.npz in the encoder's directory


class CTCFrameEncoder:
    """A `FrameEncoder` (slm.speech.units) whose frames are a recognizer's encoder states."""

    def __init__(self, recognizer: Recognizer, directory: str):
        self.recognizer = recognizer
        self.directory = directory  # where it is saved, relative to the tokenizers directory

    @property
    def sample_rate(self) -> int:
        return FEATURES.sample_rate

    @property
    def frame_rate(self) -> float:
        return FEATURES.frame_rate

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        states_td = self.recognizer.states([wave], self.sample_rate)[0]
        frames = 1 + len(wave) // FEATURES.hop  # librosa's centred frame count at 50 Hz
        return np.repeat(states_td, 2, axis=0)[:frames]

    def spec(self) -> dict[str, Any]:
        return {"kind": "ctc", "dir": self.directory}

    def save(self, tokenizers_dir: str | Path) -> None:
        self.recognizer.save(Path(tokenizers_dir) / self.directory, NAME)

    @classmethod
    def load(cls, spec: dict[str, Any], tokenizers_dir: str | Path) -> CTCFrameEncoder:
        return cls(Recognizer.load(Path(tokenizers_dir) / spec["dir"], NAME), spec["dir"])


def train_ctc_encoder(waves: Sequence[np.ndarray], texts: Sequence[str], steps: int, seed: int,
                      directory: str = "unit_encoder") -> CTCFrameEncoder:
    """A recognizer trained on transcribed `waves` (at 16 kHz), as a unit encoder. The seed is
    offset so it never equals the judge's, which must stay an independent listener."""
    params = train_recognizer(waves, texts, steps, seed + 1000, RecognizerConfig(), log_every=100)
    return CTCFrameEncoder(Recognizer(params), directory)
