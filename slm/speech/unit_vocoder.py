"""Unit vocoder: phonetic unit ids -> speech, for strategies whose model speaks in units.

SpeechGPT's chain of modality, SpiRit-LM's interleaving and PSLM/Mini-Omni's parallel streams
generate phonetic units (`slm.speech.units`), which need a unit-to-speech decoder to be heard.
With no pretrained unit HiFi-GAN at hand, this is the simplest real one: every unit is rendered
as the mean log-mel frame of the training frames assigned to it, and the resulting
spectrogram is turned into a wave by the codec's Griffin-Lim (`slm.speech.codec.mel_to_waves`).
Mel frames come from the codec's own analysis (`codec_frames`), so their timeline is the one
`RVQConfig` defines (50 Hz by default, the same as the default units).

Units carry phonetic content, not the speaker: the output speaks in an average of the training
voices whatever voice the units came from, so it is intelligible but robotic, and its
log-spectral distance to the original speech is bounded below by that voice mismatch.

Measured on espeak-ng speech (32 MFCC units, tokenizer and vocoder trained on 8 sentences in
en-us and en-gb, 7 held-out sentences per voice; log-spectral distance in dB, mean over
sentences):

    held-out voice     unit means   Hann 3   Hann 5   linear interp.   global mean   unquantized
    en-us (seen)          9.6        9.7     10.2        10.9             17.1          6.2
    en-gb (seen)          9.5        9.6     10.2        10.9             17.2          6.2
    en-gb-x-rp            9.8        9.9     10.4        11.2             17.2          6.3
    en-us+m3             10.3       10.5     10.9        11.4             17.5          6.4
    en-us+f3 (female)    14.0       13.5     13.5        14.3             16.5          6.8

Smoothing across unit boundaries (a Hann window over frames, or linear interpolation between
the centres of consecutive runs of a unit) made four of the five voices worse; it helped only the
female voice, whose spectra the male-trained unit means miss anyway, by pulling every frame
towards the average. So smoothing is off by default (`smoothing=1`) and kept as an option.
Averaging mel power instead of log-mel (the log of the mean power per unit) was far worse
(14.3 to 15.5 dB): loud frames dominate the mean.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from slm.errors import AudioError, CheckpointError, ConfigError, DataError, VocabError
from slm.speech.codec import RVQConfig, codec_frames, mel_to_waves
from slm.speech.units import PhoneticTokenizer
from slm import atomic

CONFIG_FILE = "unit_vocoder.json"
MELS_FILE = "unit_mels.npz"
FORMAT_VERSION = 1
KIND = "unit_mean_mel"


class UnitVocoder:
    """Frame-level unit ids -> per-unit mean log-mel frames -> Griffin-Lim wave.

    `mels_um[u]` is the log-mel frame (`cfg.n_mels` bins, the codec's analysis) rendered for unit
    u. `unit_frame_rate` is the rate of the unit sequences `decode` takes (the tokenizer's frame
    rate; the mel frame rate `cfg.frame_rate` by default). When the two differ, every mel frame
    takes the unit nearest to it in time (ties go to the later unit), so N units last about
    N / unit_frame_rate seconds either way. `smoothing` is the length in mel frames of a Hann
    window run over the log-mel frames before Griffin-Lim (odd; 1 = off, the measured best, see
    the module docstring).
    """

    def __init__(self, mels_um: np.ndarray, cfg: RVQConfig, smoothing: int = 1, *,
                 unit_frame_rate: float | None = None) -> None:
        mels_um = np.asarray(mels_um, dtype=np.float32)
        if mels_um.ndim != 2 or mels_um.shape[0] == 0 or mels_um.shape[1] != cfg.n_mels:
            raise ConfigError(f"unit mel frames of shape {mels_um.shape} do not fit the codec config "
                              f"(expected [num_units >= 1, n_mels={cfg.n_mels}])")
        if not np.all(np.isfinite(mels_um)):
            raise ConfigError("unit mel frames hold NaN or inf values")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, np.integer)) \
                or smoothing < 1 or smoothing % 2 == 0:
            raise ConfigError(f"unit vocoder smoothing must be an odd window length >= 1 "
                              f"(1 = off), got {smoothing!r}")
        unit_frame_rate = cfg.frame_rate if unit_frame_rate is None else float(unit_frame_rate)
        if not np.isfinite(unit_frame_rate) or unit_frame_rate <= 0:
            raise ConfigError(f"unit vocoder unit_frame_rate must be > 0 Hz, got {unit_frame_rate}")
        self.mels_um = mels_um
        self.cfg = cfg
        self.smoothing = int(smoothing)
        self.unit_frame_rate = unit_frame_rate

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        """Unit frames per second that `decode` expects (the tokenizer's rate before dedup)."""
        return self.unit_frame_rate

    @property
    def mel_frame_rate(self) -> float:
        return self.cfg.frame_rate

    @property
    def num_units(self) -> int:
        return self.mels_um.shape[0]

    def mel_frames(self, units: np.ndarray) -> np.ndarray:
        """`[T_mel, n_mels]` log-mel frames (after smoothing) that `decode` hands to Griffin-Lim.

        T_mel = len(units) when the unit and mel frame rates agree, else
        round(len(units) * mel_rate / unit_rate) (at least 1 for a non-empty sequence).
        """
        units = self._checked(units)
        if units.size == 0:
            return np.zeros((0, self.cfg.n_mels), np.float32)
        ratio = self.unit_frame_rate / self.mel_frame_rate
        if ratio != 1.0:
            num_mel = max(1, int(np.floor(units.size / ratio + 0.5)))
            units = units[_nearest_frames(num_mel, ratio, units.size)]
        return _hann_smooth(self.mels_um[units], self.smoothing)

    def decode(self, units: np.ndarray) -> np.ndarray:
        """Float32 mono wave at `sample_rate` from frame-level unit ids in [0, num_units).

        The wave has `(T_mel - 1) * hop` samples (the codec's length convention), i.e. about
        `len(units) * sample_rate / frame_rate`, short by less than one unit frame. Deterministic:
        Griffin-Lim starts from a fixed random phase. For a deduplicated tokenizer, expand first:
        `np.repeat(ids, durations)`.
        """
        return self.decode_batch([units])[0]

    def decode_batch(self, units: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The wave of each unit sequence, their Griffin-Lim run as one batch."""
        return mel_to_waves([self.mel_frames(u) for u in units], self.cfg)

    def save(self, directory: str | Path) -> None:
        """`unit_vocoder.json` (config) and `unit_mels.npz` (`mels_um`), each written atomically."""
        directory = Path(directory)
        atomic.write_npz(directory / MELS_FILE, mels_um=self.mels_um)
        atomic.write_json(directory / CONFIG_FILE, {
            "format": FORMAT_VERSION, "kind": KIND, "codec_config": asdict(self.cfg),
            "smoothing": self.smoothing, "unit_frame_rate": self.unit_frame_rate,
            "num_units": self.num_units})

    @classmethod
    def load(cls, directory: str | Path) -> UnitVocoder:
        directory = Path(directory)
        config, arrays = atomic.read_artifact(directory, CONFIG_FILE, MELS_FILE, KIND,
                                              FORMAT_VERSION, "unit vocoder")
        try:
            cfg = RVQConfig(**config["codec_config"])
            vocoder = cls(arrays["mels_um"], cfg, config["smoothing"],
                          unit_frame_rate=config["unit_frame_rate"])
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{directory / CONFIG_FILE}: bad unit vocoder config ({err})") from err
        if config.get("num_units") != vocoder.num_units:
            raise CheckpointError(f"{directory}: config says {config.get('num_units')} units but "
                                  f"{MELS_FILE} holds {vocoder.num_units}")
        return vocoder

    def _checked(self, units: np.ndarray) -> np.ndarray:
        units = np.asarray(units)
        if units.ndim != 1:
            raise VocabError(f"the unit vocoder takes a 1-D sequence of frame-level unit ids, "
                             f"got shape {units.shape}")
        if units.size == 0:
            return np.zeros(0, np.int64)
        if units.dtype.kind not in "iu":
            raise VocabError(f"unit ids must be integers, got dtype {units.dtype}")
        bad = np.flatnonzero((units < 0) | (units >= self.num_units))
        if bad.size:
            raise VocabError(f"unit id {int(units[bad[0]])} (at frame {int(bad[0])}, {bad.size} bad "
                             f"in all) is out of range: valid unit ids are 0..{self.num_units - 1}")
        return units.astype(np.int64)


def train_unit_vocoder(tokenizer: PhoneticTokenizer, waves: Sequence[tuple[np.ndarray, int]],
                       cfg: RVQConfig = RVQConfig(), smoothing: int = 1) -> UnitVocoder:
    """Mean codec log-mel frame per unit of `tokenizer` over the `(wave, sample_rate)` clips.

    Units are the tokenizer's frame-level ids (`centroids.assign(frames)`, never deduplicated)
    and mel frames come from `codec_frames`; the two counts may differ by a frame, so each clip
    is cut to the shorter. If the tokenizer's frame rate differs from `cfg.frame_rate`, each mel
    frame is paired with the unit nearest in time. Units no training frame was assigned to get
    the mean of all training frames.
    """
    units_per_clip, mels_per_clip = [], []
    ratio = tokenizer.frame_rate / cfg.frame_rate
    for i, (wave, rate) in enumerate(waves):
        try:
            units = tokenizer.centroids.assign(tokenizer.frames(wave, rate))
            mels_tm = codec_frames(wave, rate, cfg)
        except AudioError as err:
            raise AudioError(f"training clip {i}: {err}") from err
        if ratio != 1.0:
            idx = _nearest_frames(mels_tm.shape[0], ratio, None)
            keep = idx < units.size
            units, mels_tm = units[idx[keep]], mels_tm[keep]
        n = min(units.size, mels_tm.shape[0])
        units_per_clip.append(units[:n])
        mels_per_clip.append(mels_tm[:n])
    if not units_per_clip or sum(u.size for u in units_per_clip) == 0:
        raise DataError("train_unit_vocoder got no audio frames to learn from")
    mels_um, _ = unit_mean_frames(np.concatenate(units_per_clip), np.concatenate(mels_per_clip),
                                  tokenizer.num_units)
    return UnitVocoder(mels_um, cfg, smoothing, unit_frame_rate=tokenizer.frame_rate)


def unit_mean_frames(units_t: np.ndarray, frames_tm: np.ndarray,
                     num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(`[num_units, M]` mean frame per unit, `[num_units]` frame counts); units with no frame
    get the mean of all frames. Sums are accumulated in float64."""
    units_t = np.asarray(units_t)
    frames_tm = np.asarray(frames_tm, np.float64)
    if units_t.ndim != 1 or frames_tm.ndim != 2 or units_t.size != frames_tm.shape[0] or units_t.size == 0:
        raise DataError(f"unit_mean_frames needs T >= 1 unit ids and [T, M] frames, got "
                        f"{units_t.shape} and {frames_tm.shape}")
    if units_t.min() < 0 or units_t.max() >= num_units:
        raise VocabError(f"unit ids in [{units_t.min()}, {units_t.max()}] do not fit "
                         f"{num_units} units (valid ids are 0..{num_units - 1})")
    sums_um = np.zeros((num_units, frames_tm.shape[1]))
    np.add.at(sums_um, units_t, frames_tm)
    counts_u = np.bincount(units_t, minlength=num_units)
    global_m = frames_tm.mean(axis=0)
    means_um = np.where(counts_u[:, None] > 0, sums_um / np.maximum(counts_u, 1)[:, None], global_m)
    return means_um.astype(np.float32), counts_u.astype(np.int64)


def _nearest_frames(num_out: int, ratio: float, num_in: int | None) -> np.ndarray:
    """Index of the input frame nearest in time to each output frame, where `ratio` is input
    frames per output frame (both centred: frame t sits at t / rate). Ties go to the later
    frame; with `num_in`, indices are clipped to the last input frame."""
    idx = np.floor(np.arange(num_out) * ratio + 0.5).astype(np.int64)
    return idx if num_in is None else np.minimum(idx, num_in - 1)


def _hann_smooth(frames_tm: np.ndarray, window: int) -> np.ndarray:
    """Weighted moving average over time with a length-`window` Hann window; edges repeat."""
    if window <= 1 or frames_tm.shape[0] < 2:
        return frames_tm.astype(np.float32)
    w = np.hanning(window + 2)[1:-1]
    w /= w.sum()
    half = window // 2
    padded = np.pad(frames_tm.astype(np.float64), ((half, half), (0, 0)), mode="edge")
    t = frames_tm.shape[0]
    return sum(w[j] * padded[j:j + t] for j in range(window)).astype(np.float32)
