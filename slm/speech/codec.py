"""Acoustic codecs: a wave <-> a grid of int32 codes `[Q, T]` from Q residual codebooks.

`Codec` is the protocol the token grid relies on; pretrained neural codecs (Mimi, EnCodec in
`slm.speech.hf_encoders`) and the weight-free `RVQCodec` below both satisfy it.

`RVQCodec` quantizes log-mel frames with residual vector quantization: codebook 1 is k-means
over the frames, codebook q is k-means over what codebooks 1..q-1 left unexplained. Decoding
sums the chosen codewords, turns the mel spectrum back into a linear magnitude spectrum and
recovers a phase with Griffin-Lim. It needs no pretrained weights and trains in seconds, so
every pipeline stage can run end to end on a laptop; it is intelligible but robotic, and is not
meant to compete with a neural codec. Because each codebook refines the previous ones, any
prefix of the Q rows is itself a valid, coarser code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import librosa
import numpy as np

from slm.errors import AudioError, CheckpointError, ConfigError, DataError, VocabError
from slm.speech.audio import resample
from slm.speech.features import LOG_FLOOR, log_mel_frames
from slm.speech.griffin_lim import mel_powers_to_waves
from slm.speech.kmeans import fit_kmeans, nearest
from slm import atomic

CONFIG_FILE = "codec.json"
CODEBOOKS_FILE = "codebooks.npz"
FORMAT_VERSION = 1
LSD_DYNAMIC_RANGE_DB = 80.0  # spectra are floored this far below the reference's peak


class Codec(Protocol):
    """What the token grid needs from an acoustic tokenizer."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def frame_rate(self) -> float: ...

    @property
    def num_codebooks(self) -> int: ...

    @property
    def codebook_size(self) -> int: ...

    def encode(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """int32 codes `[num_codebooks, T]` of a mono wave at `sample_rate` (resampled as needed)."""
        ...

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """A float32 mono wave at `self.sample_rate` from codes `[num_codebooks, T]`."""
        ...

    def decode_batch(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`decode` of each code grid; a codec decodes them together where it can batch."""
        ...


@dataclass(frozen=True)
class RVQConfig:
    """Defaults: 16 kHz, 50 ms windows every 20 ms, 128 mel bins, 4 x 256 codes (1.6 kbit/s).

    50 Hz is the frame rate of the default phonetic units too, so semantic and acoustic tokens
    share one timeline. On espeak speech 128 mel bins lowered the unquantized mel -> Griffin-Lim
    log-spectral distance from about 8 dB (80 bins, 64 ms / 16 ms frames) to about 6 dB.
    """

    sample_rate: int = 16000
    n_fft: int = 800
    hop: int = 320
    n_mels: int = 128
    num_codebooks: int = 4
    codebook_size: int = 256
    griffin_lim_iters: int = 64

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop", "n_mels", "num_codebooks", "codebook_size",
                     "griffin_lim_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"codec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hop > self.n_fft:
            raise ConfigError(f"codec.hop {self.hop} exceeds n_fft {self.n_fft}; frames would skip "
                              f"audio and Griffin-Lim could not overlap-add them")

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop


class RVQCodec:
    """Residual VQ of log-mel frames with a Griffin-Lim decoder; see the module docstring."""

    def __init__(self, cfg: RVQConfig, codebooks_qcd: np.ndarray) -> None:
        codebooks_qcd = np.asarray(codebooks_qcd, dtype=np.float32)
        expected = (cfg.num_codebooks, cfg.codebook_size, cfg.n_mels)
        if codebooks_qcd.shape != expected:
            raise ConfigError(f"codebooks of shape {codebooks_qcd.shape} do not fit the codec config "
                              f"(expected {expected})")
        self.cfg = cfg
        self.codebooks_qcd = codebooks_qcd

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.cfg.frame_rate

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def encode(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """int32 `[Q, T]`, T = 1 + samples // hop after resampling to the codec's rate."""
        return quantize(codec_frames(wave, sample_rate, self.cfg), self.codebooks_qcd)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Float32 wave of `(T - 1) * hop` samples; codes may hold only the first q <= Q rows."""
        return self.decode_batch([codes])[0]

    def decode_batch(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        return mel_to_waves([dequantize(self._checked(c), self.codebooks_qcd) for c in codes], self.cfg)

    def save(self, directory: str | Path) -> None:
        """`codec.json` (the config) and `codebooks.npz` (`codebooks_qcd`) in `directory`."""
        directory = Path(directory)
        atomic.write_npz(directory / CODEBOOKS_FILE, codebooks_qcd=self.codebooks_qcd)
        atomic.write_json(directory / CONFIG_FILE,
                          {"format": FORMAT_VERSION, "kind": "rvq", "config": asdict(self.cfg)})

    @classmethod
    def load(cls, directory: str | Path) -> RVQCodec:
        directory = Path(directory)
        config, arrays = atomic.read_artifact(directory, CONFIG_FILE, CODEBOOKS_FILE, "rvq",
                                              FORMAT_VERSION, "RVQ codec")
        try:
            codebooks_qcd = arrays["codebooks_qcd"]
            cfg = RVQConfig(**config["config"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{directory / CONFIG_FILE}: bad codec config ({err})") from err
        return cls(cfg, codebooks_qcd)

    def _checked(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or not 1 <= codes.shape[0] <= self.num_codebooks or codes.dtype.kind not in "iu":
            raise VocabError(f"codes must be integers of shape [q <= {self.num_codebooks}, T], "
                             f"got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise VocabError(f"codes must lie in [0, {self.codebook_size}), "
                             f"got values in [{codes.min()}, {codes.max()}]")
        return codes


def train_rvq_codec(waves: Sequence[tuple[np.ndarray, int]], cfg: RVQConfig = RVQConfig(),
                    seed: int = 0, *, steps: int = 300, batch_size: int = 1024) -> RVQCodec:
    """Fit the Q codebooks one after another, each by k-means on the previous residual.

    k-means++ seeding spreads every codebook over its residual, so no codeword starts out
    unreachable, and the k-means revives any that ends up so: all C codes stay in use.
    """
    pooled = []
    for i, (wave, rate) in enumerate(waves):
        try:
            pooled.append(codec_frames(wave, rate, cfg))
        except AudioError as err:
            raise AudioError(f"training clip {i}: {err}") from err
    if not pooled:
        raise DataError("train_rvq_codec got no audio clips")
    residual_td = np.concatenate(pooled)
    codebooks = []
    for q in range(cfg.num_codebooks):
        centroids = fit_kmeans(residual_td, cfg.codebook_size, seed=_codebook_seed(seed, q),
                               steps=steps, batch_size=batch_size)
        residual_td = residual_td - centroids.centers_kd[centroids.assign(residual_td)]
        codebooks.append(centroids.centers_kd)
    return RVQCodec(cfg, np.stack(codebooks))


def codec_frames(wave: np.ndarray, sample_rate: int, cfg: RVQConfig) -> np.ndarray:
    """`[T, n_mels]` log-mel frames the codec quantizes; silence is fine, an empty clip is not."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise AudioError(f"the codec needs a non-empty mono wave of shape [samples], got {wave.shape}")
    wave = resample(wave, sample_rate, cfg.sample_rate)
    return log_mel_frames(wave, cfg.sample_rate, cfg.n_fft, cfg.hop, cfg.n_mels)


def quantize(frames_td: np.ndarray, codebooks_qcd: np.ndarray) -> np.ndarray:
    """int32 `[Q, T]`: codebook q encodes what codebooks before it left of each frame."""
    residual_td = frames_td
    codes = []
    for codebook_cd in codebooks_qcd:
        idx_t = nearest(residual_td, codebook_cd)[0]
        residual_td = residual_td - codebook_cd[idx_t]
        codes.append(idx_t)
    return np.stack(codes).astype(np.int32)


def dequantize(codes_qt: np.ndarray, codebooks_qcd: np.ndarray) -> np.ndarray:
    """`[T, D]`: the sum over the given rows q of codeword `codes_qt[q, t]` of codebook q."""
    q = np.arange(codes_qt.shape[0])[:, None]
    return codebooks_qcd[q, codes_qt].sum(axis=0)


def mel_to_waves(logmels_tm: Sequence[np.ndarray], cfg: RVQConfig) -> list[np.ndarray]:
    """Log-mel power frames `[T, M]` -> waves of `(T - 1) * hop` samples (empty below two
    frames): non-negative least-squares magnitude, then Griffin-Lim phase, all spectrograms
    in one jitted batch (`slm.speech.griffin_lim`)."""
    powers = [np.maximum(np.exp(np.asarray(m, np.float32)) - LOG_FLOOR, 0.0) for m in logmels_tm]
    long_enough = [i for i, p in enumerate(powers) if p.shape[0] >= 2]
    waves = mel_powers_to_waves([powers[i] for i in long_enough], cfg.sample_rate, cfg.n_fft,
                                cfg.hop, cfg.griffin_lim_iters)
    out = [np.zeros(0, np.float32)] * len(powers)
    for i, wave in zip(long_enough, waves):
        out[i] = wave
    return out


def mel_to_wave(logmel_tm: np.ndarray, cfg: RVQConfig) -> np.ndarray:
    """One spectrogram's wave; see `mel_to_waves`."""
    return mel_to_waves([logmel_tm], cfg)[0]


def log_spectral_distance(ref_wave: np.ndarray, test_wave: np.ndarray, sample_rate: int) -> float:
    """Mean over STFT frames of the RMS (over frequency) difference of the power spectra, in dB.

    Waves are cut to the shorter one; windows are the power of two at or above 32 ms, hop 1/4. Both spectra are floored
    `LSD_DYNAMIC_RANGE_DB` below the reference's peak, as digital silence would otherwise score
    the log of whatever epsilon was chosen instead of anything audible.
    """
    n = min(len(ref_wave), len(test_wave))
    n_fft = 1 << int(np.ceil(np.log2(0.032 * sample_rate)))
    if n < n_fft:
        raise AudioError(f"log_spectral_distance needs at least {n_fft} samples per wave, got {n}")
    power_ft = [np.abs(librosa.stft(np.asarray(w[:n], np.float32), n_fft=n_fft, hop_length=n_fft // 4)) ** 2
                for w in (ref_wave, test_wave)]
    floor = max(float(power_ft[0].max()), 1e-20) * 10.0 ** (-LSD_DYNAMIC_RANGE_DB / 10.0)
    ref_db, test_db = (10.0 * np.log10(np.maximum(p, floor)) for p in power_ft)
    return float(np.mean(np.sqrt(np.mean((ref_db - test_db) ** 2, axis=0))))


def _codebook_seed(seed: int, q: int) -> int:
    """An independent k-means seed per codebook, so codecs with seeds s and s+1 share none."""
    return int(np.random.SeedSequence([seed, q]).generate_state(1)[0])
