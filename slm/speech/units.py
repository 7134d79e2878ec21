"""Phonetic units: every frame of speech becomes the id of its nearest k-means center.

This is the HuBERT/GSLM recipe for "discrete speech": frames from some encoder are clustered,
and a clip becomes a sequence of cluster ids at the encoder's frame rate. The encoder is
pluggable through the small `FrameEncoder` protocol, so librosa features (`LibrosaFrames`, no
weights needed) and a pretrained self-supervised model are interchangeable; only the clusters
and the encoder's `spec()` are saved, as JSON plus an npz, never as pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from slm.errors import AudioError, CheckpointError, ConfigError, DataError
from slm.speech.audio import resample
from slm.speech.features import FeatureConfig, LibrosaFrames
from slm import atomic
from slm.speech.kmeans import Centroids, fit_kmeans
from slm.speech.runs import dedup_units

CONFIG_FILE = "tokenizer.json"
CENTERS_FILE = "centroids.npz"
FORMAT_VERSION = 1


class FrameEncoder(Protocol):
    """Turns a mono wave at `sample_rate` into `[T, D]` frame vectors at `frame_rate` Hz."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def frame_rate(self) -> float: ...

    def __call__(self, wave: np.ndarray) -> np.ndarray: ...

    def spec(self) -> dict[str, Any]:
        """JSON-able recipe to rebuild the encoder, e.g. {"kind": "hf", "model_dir": ..., "layer": 6}."""
        ...


EncoderFactory = Callable[[dict[str, Any]], FrameEncoder]


class PhoneticTokenizer:
    """Wave -> int32 unit ids: frames of `encoder`, each mapped to its nearest center."""

    def __init__(self, encoder: FrameEncoder | FeatureConfig, centroids: Centroids,
                 dedup: bool = False) -> None:
        self.encoder = LibrosaFrames(encoder) if isinstance(encoder, FeatureConfig) else encoder
        self.centroids = centroids
        self.dedup = dedup

    @property
    def frame_rate(self) -> float:
        """Frames per second before deduplication (with `dedup` units are run-length compressed)."""
        return self.encoder.frame_rate

    @property
    def sample_rate(self) -> int:
        return self.encoder.sample_rate

    @property
    def num_units(self) -> int:
        return self.centroids.k

    def frames(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """`[T, D]` encoder frames of a wave at any rate; it is resampled to the encoder's first."""
        frames_td = np.asarray(self.encoder(resample(wave, sample_rate, self.sample_rate)))
        if frames_td.ndim != 2 or frames_td.shape[1] != self.centroids.dim:
            raise ConfigError(f"the encoder gives frames of shape {frames_td.shape} but the "
                              f"centroids have dim {self.centroids.dim}; they were trained apart")
        return frames_td

    def encode(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """int32 unit ids, one per frame (or one per run of equal ids when `dedup`)."""
        return self.encode_frames(wave, sample_rate)[0]

    def encode_frames(self, wave: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        """Units (as `encode`) and the encoder frames `[T, D]` they quantize, computed once."""
        frames_td = self.frames(wave, sample_rate)
        units = self.centroids.assign(frames_td)
        return (dedup_units(units)[0] if self.dedup else units), frames_td

    def save(self, directory: str | Path) -> None:
        """`tokenizer.json` (encoder spec, dedup) and `centroids.npz` in `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.centroids.save(directory / CENTERS_FILE)
        atomic.write_json(directory / CONFIG_FILE, {
            "format": FORMAT_VERSION, "encoder_spec": self.encoder.spec(), "dedup": self.dedup,
            "num_units": self.num_units})

    @classmethod
    def load(cls, directory: str | Path,
             make_encoder: EncoderFactory | None = None) -> PhoneticTokenizer:
        """Rebuild a saved tokenizer; `make_encoder(spec)` builds any encoder but the librosa one
        (for HuBERT/WavLM units pass `slm.speech.hf_encoders.HFFrameEncoder.from_spec`)."""
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{directory}: no readable {CONFIG_FILE} ({err})") from err
        if config.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{directory / CONFIG_FILE}: format {config.get('format')!r}, "
                                  f"this slm reads format {FORMAT_VERSION}")
        encoder = _build_encoder(config["encoder_spec"], make_encoder)
        return cls(encoder, Centroids.load(directory / CENTERS_FILE), dedup=bool(config["dedup"]))


def train_phonetic_tokenizer(waves: Sequence[tuple[np.ndarray, int]],
                             features: FrameEncoder | FeatureConfig, num_units: int, seed: int = 0,
                             *, dedup: bool = False, steps: int = 200,
                             batch_size: int = 1024) -> PhoneticTokenizer:
    """Cluster the pooled frames of `(wave, sample_rate)` clips into `num_units` units."""
    encoder = LibrosaFrames(features) if isinstance(features, FeatureConfig) else features
    pooled = []
    for i, (wave, rate) in enumerate(waves):
        try:
            pooled.append(np.asarray(encoder(resample(wave, rate, encoder.sample_rate))))
        except AudioError as err:
            raise AudioError(f"training clip {i}: {err}") from err
    if not pooled:
        raise DataError("train_phonetic_tokenizer got no audio clips")
    centroids = fit_kmeans(np.concatenate(pooled), num_units, seed=seed, steps=steps,
                           batch_size=batch_size)
    return PhoneticTokenizer(encoder, centroids, dedup=dedup)


def unit_purity(units_per_frame: np.ndarray, labels_per_frame: np.ndarray) -> tuple[float, float]:
    """(purity, PNMI) of units against reference frame labels (e.g. phones), as in HuBERT.

    purity: fraction of frames whose label is the majority label of their unit, i.e. the
    accuracy of the best unit -> label map. PNMI: I(unit; label) / H(label), the share of label
    uncertainty a unit removes (1.0 when labels carry no uncertainty). Labels may be any values.
    """
    units, labels = np.asarray(units_per_frame), np.asarray(labels_per_frame)
    if units.shape != labels.shape or units.ndim != 1 or units.size == 0:
        raise DataError(f"unit_purity needs two equal-length 1-D sequences, got {units.shape} "
                        f"and {labels.shape}")
    _, unit_n = np.unique(units, return_inverse=True)
    _, label_n = np.unique(labels, return_inverse=True)
    joint_ul = np.zeros((unit_n.max() + 1, label_n.max() + 1))
    np.add.at(joint_ul, (unit_n, label_n), 1.0)
    joint_ul /= units.size
    purity = float(joint_ul.max(axis=1).sum())
    p_u, p_l = joint_ul.sum(axis=1), joint_ul.sum(axis=0)
    nz = joint_ul > 0
    mutual = float(np.sum(joint_ul[nz] * np.log(joint_ul[nz] / np.outer(p_u, p_l)[nz])))
    label_entropy = float(-np.sum(p_l * np.log(p_l)))
    return purity, (mutual / label_entropy if label_entropy > 0 else 1.0)


def _build_encoder(spec: dict[str, Any], make_encoder: EncoderFactory | None) -> FrameEncoder:
    if spec.get("kind") == "librosa":
        return LibrosaFrames(FeatureConfig.from_dict(spec["features"]))
    if make_encoder is None:
        raise ConfigError(f"the tokenizer was trained on a {spec.get('kind')!r} encoder; pass "
                          f"make_encoder=<function spec -> FrameEncoder> to load it")
    return make_encoder(spec)
