"""Audio in and out: mono float32 waveforms in [-1, 1] at an explicit sample rate.

Every reader goes through `load_audio`, so a truncated, corrupt or unsupported file, or one
at another sample rate, is handled in one place with one kind of error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from slm.errors import AudioError

SILENCE_RMS = 1e-4  # below this the clip carries no speech worth tokenizing


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read any format libsndfile knows, mix to mono and resample to `sample_rate`."""
    return resample(*read_audio(path), sample_rate)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A file's samples mixed to mono, at its own sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file; give the path of a WAV or FLAC file")
    try:
        wave, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioError(
            f"{path}: cannot decode audio ({err}); convert it to WAV/FLAC, e.g. "
            f"`sox {path.name} -c 1 out.wav`"
        ) from err
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples (truncated?)")
    return wave.mean(axis=1), file_rate


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return wave.astype(np.float32)
    import soxr

    return soxr.resample(wave.astype(np.float32), from_rate, to_rate).astype(np.float32)


def save_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV, written to a temporary name and renamed so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sf.write(tmp, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)


def is_silent(wave: np.ndarray) -> bool:
    return wave.size == 0 or float(np.sqrt(np.mean(np.square(wave)))) < SILENCE_RMS
