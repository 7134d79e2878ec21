"""The built-in RVQ codec: code shapes, round trips, resampling, and quality on an unseen voice."""

import shutil

import numpy as np
import pytest

from slm.errors import AudioError, VocabError
from slm.speech.audio import resample
from slm.speech.codec import (Codec, RVQCodec, RVQConfig, codec_frames, log_spectral_distance,
                              mel_to_wave, train_rvq_codec)
from tests.test_features_kmeans import speak, tone

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "The rainbow is a division of white light into many beautiful colors.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "The weather today is cloudy with a chance of light rain in the evening.",
]
HELD_OUT_TEXT = "When the sunlight strikes raindrops in the air, they act as a prism."
CFG = RVQConfig(num_codebooks=4, codebook_size=256)
RESYNTHESIS_LSD_BOUND_DB = 12.0  # measured 9.7 dB at Q=4 on the held-out voice; 6.7 dB unquantized


def training_speech(tmp) -> list:
    """TRAIN_TEXT in two male voices (22.05 kHz); shared with the unit vocoder's tests."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return [speak(text, voice, tmp / f"{voice}_{i}.wav")
            for voice in ("en-us", "en-gb") for i, text in enumerate(TRAIN_TEXT)]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Training clips from two male voices (22.05 kHz) and a held-out sentence by a third voice."""
    tmp = tmp_path_factory.mktemp("speech")
    return training_speech(tmp), speak(HELD_OUT_TEXT, "en-us+f3", tmp / "held_out.wav")


@pytest.fixture(scope="module")
def codec(speech):
    return train_rvq_codec(speech[0], CFG, seed=0)


def test_rvq_codec_satisfies_the_codec_protocol(codec):
    as_codec: Codec = codec
    assert (as_codec.sample_rate, as_codec.frame_rate) == (16000, 50.0)
    assert (as_codec.num_codebooks, as_codec.codebook_size) == (4, 256)


def test_codes_have_shape_q_by_t_and_lie_in_the_codebook(codec, speech):
    wave, rate = speech[1]
    codes = codec.encode(resample(wave, rate, 16000), 16000)
    samples = resample(wave, rate, 16000).size
    assert codes.dtype == np.int32 and codes.shape == (4, 1 + samples // CFG.hop)
    assert codes.min() >= 0 and codes.max() < CFG.codebook_size
    decoded = codec.decode(codes)
    assert decoded.dtype == np.float32 and abs(decoded.size - samples) < CFG.hop


def test_every_code_is_used_on_the_training_frames(codec, speech):
    """Holds because the ~2500 training frames fit in k-means' revival sample (10000 frames)."""
    codes_qt = np.concatenate([codec.encode(w, r) for w, r in speech[0]], axis=1)
    for row in codes_qt:
        assert np.unique(row).size == CFG.codebook_size


def test_quality_improves_with_each_codebook_on_an_unseen_voice(codec, speech):
    wave, rate = speech[1]
    ref = resample(wave, rate, codec.sample_rate)
    codes = codec.encode(wave, rate)
    lsd = {q: log_spectral_distance(ref, codec.decode(codes[:q]), codec.sample_rate) for q in (1, 2, 4)}
    unquantized = log_spectral_distance(ref, mel_to_wave(codec_frames(wave, rate, CFG), CFG), 16000)
    assert unquantized < lsd[4] < lsd[2] < lsd[1]
    assert lsd[4] < RESYNTHESIS_LSD_BOUND_DB


def test_save_load_gives_identical_codes(codec, speech, tmp_path):
    codec.save(tmp_path / "codec")
    loaded = RVQCodec.load(tmp_path / "codec")
    wave, rate = speech[1]
    np.testing.assert_array_equal(loaded.encode(wave, rate), codec.encode(wave, rate))
    assert loaded.cfg == codec.cfg


def test_other_sample_rates_are_resampled_first(codec):
    wave_8k = tone(1.0, 300.0, rate=8000)
    codes = codec.encode(wave_8k, 8000)
    np.testing.assert_array_equal(codes, codec.encode(resample(wave_8k, 8000, 16000), 16000))
    assert codes.shape == (4, 1 + 16000 // CFG.hop)


def test_bad_input_raises(codec):
    with pytest.raises(VocabError, match="lie in"):
        codec.decode(np.full((4, 10), CFG.codebook_size))
    with pytest.raises(VocabError, match="shape"):
        codec.decode(np.zeros((5, 10), np.int32))
    with pytest.raises(AudioError, match="non-empty"):
        codec.encode(np.zeros(0, np.float32), 16000)
    assert codec.encode(np.zeros(16000, np.float32), 16000).shape == (4, 51)  # silence is valid


def test_log_spectral_distance_basics():
    wave = tone(1.0) + 0.01 * np.random.default_rng(0).normal(size=16000).astype(np.float32)
    assert log_spectral_distance(wave, wave, 16000) == 0.0
    assert log_spectral_distance(wave, np.concatenate([wave, wave]), 16000) == 0.0  # cut to the shorter
    assert log_spectral_distance(wave, 0.5 * wave, 16000) == pytest.approx(20 * np.log10(2), rel=0.01)
    with pytest.raises(AudioError):
        log_spectral_distance(wave[:100], wave[:100], 16000)
