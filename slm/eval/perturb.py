"""What happens to a question's audio before a model hears it: perturbations and controls.

Perturbations ask whether a model still understands a question through the kinds of damage
real input has: noise at 20 and 10 dB SNR, speaking 15% faster or slower (resampling, as
Kaldi's speed perturbation: tempo and pitch move together), a 3 kHz low-pass (a telephone-ish
band), and a 44.1 kHz stereo file read through `load_audio` like any user file.

Controls are inputs from which the answer cannot be known: the question silenced, or another
question's audio in its place. A model that still scores above the answer distribution's
chance level on them is answering from something other than the question.
Every function is deterministic given its `rng`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import signal

from slm.speech.audio import load_audio, resample, save_wav

Perturbation = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def add_noise(snr_db: float) -> Perturbation:
    """White noise at `snr_db` below the speech's power (measured over samples above the
    silence floor, so the padding around a clip does not lower the speech's power)."""
    def perturb(wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
        loud = wave[np.abs(wave) > 1e-3]
        power = float(np.mean(np.square(loud if loud.size else wave)))
        noise = rng.standard_normal(wave.size) * np.sqrt(power / 10 ** (snr_db / 10))
        return (wave + noise).astype(np.float32)
    return perturb


def change_speed(factor: float) -> Perturbation:
    """`factor` times faster (shorter, higher), by resampling."""
    def perturb(wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
        return resample(wave, round(rate * factor), rate)
    return perturb


def low_pass(cutoff_hz: float) -> Perturbation:
    """An 8th-order Butterworth low-pass, run forwards and backwards (no phase shift)."""
    def perturb(wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
        sos = signal.butter(8, cutoff_hz, btype="low", fs=rate, output="sos")
        return signal.sosfiltfilt(sos, wave).astype(np.float32)
    return perturb


def stereo_file(file_rate: int = 44_100) -> Perturbation:
    """The question as a stereo WAV at `file_rate` (right channel 0.3 ms later and quieter, as
    a second microphone hears it), read back through `load_audio`: the path any user's
    recording takes."""
    def perturb(wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
        left = resample(wave, rate, file_rate)
        right = 0.8 * np.concatenate([np.zeros(round(3e-4 * file_rate), np.float32), left])[:left.size]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "question.wav"
            save_wav(path, np.stack([left, right], axis=1), file_rate)
            return load_audio(path, rate)
    return perturb


PERTURBATIONS: dict[str, Perturbation] = {
    "noise_20db": add_noise(20.0),
    "noise_10db": add_noise(10.0),
    "speed_0.85": change_speed(0.85),
    "speed_1.15": change_speed(1.15),
    "lowpass_3k": low_pass(3000.0),
    "stereo_44k": stereo_file(),
}


ROOM_NOISE_RMS = 1e-3  # -60 dBFS


def silenced(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The question's length of a quiet room: white noise at -60 dBFS. (Digital zeros are
    refused as input, since their features are the log floor and carry nothing to hear.)"""
    return (ROOM_NOISE_RMS * rng.standard_normal(wave.size)).astype(np.float32)


def shuffled_order(count: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point: question i hears question order[i]'s audio."""
    if count < 2:
        raise ValueError("shuffling needs at least two questions")
    order = rng.permutation(count)
    return np.roll(order, 1)[np.argsort(order)]
