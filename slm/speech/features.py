"""Frame features (log-mel or MFCC) at an exact, stated frame rate.

Speech tokens are only useful to a language model if every tokenizer agrees on how many frames a
clip has, so the frame rate is part of the config and the hop is derived from it: 50 Hz at 16 kHz
is a hop of 320 samples. A rate that does not divide the sample rate is refused rather than
rounded, because a rounded hop would silently drift against the text/unit timeline.

Frames are centred (librosa's `center=True`), so a clip of n samples has `1 + n // hop` frames
and frame t describes the audio around sample `t * hop`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import librosa
import numpy as np

from slm.errors import AudioError, ConfigError
from slm.speech.audio import SILENCE_RMS, is_silent

LOG_FLOOR = 1e-6  # added to mel power before the log; about 60 dB below a loud vowel
CMVN_STD_FLOOR = 1e-5  # a constant feature stays constant instead of being blown up


@dataclass(frozen=True)
class FeatureConfig:
    """What `extract` computes; frozen so a tokenizer's saved config is the one it ran with."""

    kind: Literal["logmel", "mfcc"] = "logmel"
    sample_rate: int = 16000
    frame_rate: float = 50.0  # Hz; hop = sample_rate / frame_rate must be a whole number
    n_fft: int = 400
    n_mels: int = 80
    n_mfcc: int = 20
    deltas: bool = False  # append first and second time derivatives (x3 dimensions)
    cmvn: bool = True  # per-utterance mean/variance normalization, removes channel and level

    def __post_init__(self) -> None:
        if self.kind not in ("logmel", "mfcc"):
            raise ConfigError(f"features.kind must be 'logmel' or 'mfcc', got {self.kind!r}")
        if self.sample_rate <= 0 or self.frame_rate <= 0:
            raise ConfigError(f"features: sample_rate and frame_rate must be > 0, got {self}")
        hop = self.sample_rate / self.frame_rate
        if abs(hop - round(hop)) > 1e-9:
            raise ConfigError(
                f"features: frame_rate {self.frame_rate} Hz gives a hop of {hop:.3f} samples at "
                f"{self.sample_rate} Hz; pick a frame rate that divides the sample rate (e.g. 50, 25)"
            )
        if self.n_fft < self.hop:
            raise ConfigError(f"features: n_fft {self.n_fft} is shorter than the hop {self.hop}, so "
                              f"frames would skip audio; raise n_fft to at least {self.hop}")
        if self.kind == "mfcc" and self.n_mfcc > self.n_mels:
            raise ConfigError(f"features: n_mfcc {self.n_mfcc} cannot exceed n_mels {self.n_mels}")

    @property
    def hop(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    @property
    def dim(self) -> int:
        """Feature dimension F of `extract`'s `[T, F]` output."""
        base = self.n_mels if self.kind == "logmel" else self.n_mfcc
        return base * (3 if self.deltas else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"features: unknown keys {sorted(unknown)}")
        return cls(**d)


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Frames `extract` returns for a clip of `num_samples` (centred framing)."""
    return 1 + num_samples // cfg.hop


def log_mel_frames(wave: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int,
                   floor: float = LOG_FLOOR) -> np.ndarray:
    """`[T, n_mels]` natural-log mel power; shared with the codec so both see the same spectra."""
    mel_mt = librosa.feature.melspectrogram(
        y=np.asarray(wave, np.float32), sr=sample_rate, n_fft=n_fft, hop_length=hop,
        n_mels=n_mels, center=True, power=2.0)
    return np.log(mel_mt + floor).T.astype(np.float32)


def extract(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """`[T, F]` float32 features of a mono wave already at `cfg.sample_rate`."""
    _check_wave(wave, cfg)
    logmel_tm = log_mel_frames(wave, cfg.sample_rate, cfg.n_fft, cfg.hop, cfg.n_mels)
    feats_tf = logmel_tm if cfg.kind == "logmel" else _mfcc(logmel_tm, cfg.n_mfcc)
    if cfg.deltas:
        feats_tf = _with_deltas(feats_tf)
    if cfg.cmvn:
        feats_tf = cmvn(feats_tf)
    return feats_tf.astype(np.float32)


def cmvn(feats_tf: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per dimension over the utterance's frames."""
    std_f = np.maximum(feats_tf.std(axis=0), CMVN_STD_FLOOR)
    return (feats_tf - feats_tf.mean(axis=0)) / std_f


def _check_wave(wave: np.ndarray, cfg: FeatureConfig) -> None:
    """Refuse input whose features would be meaningless, saying why, before librosa does."""
    if wave.ndim != 1:
        raise AudioError(f"features need a mono 1-D wave, got shape {wave.shape}; mix channels first")
    if wave.size < cfg.n_fft:
        raise AudioError(
            f"audio too short: {wave.size} samples ({wave.size / cfg.sample_rate * 1000:.1f} ms) is "
            f"less than one analysis window of {cfg.n_fft} samples at {cfg.sample_rate} Hz")
    if not np.all(np.isfinite(wave)):
        raise AudioError("audio holds NaN or inf samples; the file or the resampler is broken")
    if is_silent(wave):
        raise AudioError(
            f"audio is silent (RMS below {SILENCE_RMS}); its features would be the log floor only, "
            f"which carries no speech to tokenize")


def _mfcc(logmel_tm: np.ndarray, n_mfcc: int) -> np.ndarray:
    """DCT-II of the log-mel frames, i.e. librosa's MFCC without recomputing the spectrogram."""
    return librosa.feature.mfcc(S=logmel_tm.T, n_mfcc=n_mfcc).T


def _with_deltas(feats_tf: np.ndarray) -> np.ndarray:
    """Append first and second derivatives; 'nearest' edges so even 1-frame clips work."""
    d1 = librosa.feature.delta(feats_tf, order=1, axis=0, mode="nearest")
    d2 = librosa.feature.delta(feats_tf, order=2, axis=0, mode="nearest")
    return np.concatenate([feats_tf, d1, d2], axis=1)


class LibrosaFrames:
    """The built-in `FrameEncoder` (see `slm.speech.units`): librosa features per `FeatureConfig`."""

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg = cfg

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.frame_rate

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        return extract(wave, self.cfg)

    def spec(self) -> dict[str, Any]:
        """JSON-able description that `units.load_phonetic_tokenizer` turns back into this object."""
        return {"kind": "librosa", "features": self.cfg.to_dict()}
