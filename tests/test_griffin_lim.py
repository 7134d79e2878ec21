"""The batched, jitted mel inversion and Griffin-Lim against librosa and closed forms."""

import jax.numpy as jnp
import librosa
import numpy as np

from slm.speech import griffin_lim
from slm.speech.codec import RVQConfig, mel_to_wave, mel_to_waves

CFG = RVQConfig()


def _magnitude(frames: int, seed: int = 0) -> np.ndarray:
    """`[F, T]` magnitudes of a gliding two-tone signal in noise: structure Griffin-Lim can lock onto."""
    t = np.arange((frames - 1) * CFG.hop) / CFG.sample_rate
    wave = np.sin(2 * np.pi * (300 + 200 * t) * t) + 0.5 * np.sin(2 * np.pi * 1200 * t)
    wave += 0.05 * np.random.default_rng(seed).normal(size=t.size)
    return np.abs(librosa.stft(wave.astype(np.float32), n_fft=CFG.n_fft, hop_length=CFG.hop))


def test_griffin_lim_iterates_as_librosa_does():
    magnitude = _magnitude(40)
    frames = magnitude.shape[1]
    want = librosa.griffinlim(magnitude, n_iter=16, hop_length=CFG.hop, n_fft=CFG.n_fft,
                              momentum=0.99, init="random", random_state=0,
                              length=(frames - 1) * CFG.hop)
    got = griffin_lim.griffin_lim(jnp.asarray(magnitude.T[None]),
                                  jnp.asarray(griffin_lim.random_phase(frames, CFG.n_fft).T[None]),
                                  jnp.array([(frames - 1) * CFG.hop]), n_fft=CFG.n_fft, hop=CFG.hop,
                                  iterations=16)
    np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-4 * np.abs(want).max())


def test_nonnegative_least_squares_solves_a_feasible_system():
    basis, inverse, lipschitz = griffin_lim.mel_basis(CFG.sample_rate, CFG.n_fft, CFG.n_mels)
    spectra = np.exp(np.random.default_rng(0).normal(size=(1, 12, basis.shape[1]))).astype(np.float32)
    target = spectra @ basis.T  # some non-negative spectrum explains it exactly

    def residual(x):
        return float(np.sum((x @ basis.T - target) ** 2))

    solved = np.asarray(griffin_lim.nonnegative_least_squares(
        jnp.asarray(target), jnp.asarray(basis), jnp.asarray(inverse), np.float32(lipschitz)))
    assert solved.min() >= 0
    assert residual(solved) < 1e-3 * residual(np.maximum(target @ inverse.T, 0))


def test_a_batched_wave_does_not_depend_on_its_batch_mates():
    rng = np.random.default_rng(1)
    short, long = (rng.normal(-2, 1, size=(t, CFG.n_mels)).astype(np.float32) for t in (30, 90))
    alone = mel_to_wave(short, CFG)
    together = mel_to_waves([long, short, short[:1]], CFG)
    assert alone.shape == ((30 - 1) * CFG.hop,)
    np.testing.assert_allclose(together[1], alone, atol=1e-3 * np.abs(alone).max())  # float drift only
    assert together[0].shape == ((90 - 1) * CFG.hop,) and together[2].size == 0  # one frame: no wave
