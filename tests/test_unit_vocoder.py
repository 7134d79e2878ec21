"""The unit vocoder: lengths, quality on unseen voices, determinism, save/load, unseen and bad ids."""


import numpy as np
import pytest

from slm.errors import CheckpointError, ConfigError, VocabError
from slm.speech.audio import resample
from slm.speech.codec import RVQConfig, codec_frames, log_spectral_distance, mel_to_wave
from slm.speech.features import FeatureConfig
from slm.speech.kmeans import Centroids
from slm.speech.unit_vocoder import UnitVocoder, train_unit_vocoder, unit_mean_frames
from slm.speech.units import PhoneticTokenizer, train_phonetic_tokenizer
from tests.test_codec import HELD_OUT_TEXT, training_speech  # the codec tests' speech
from tests.test_features_kmeans import speak

CFG = RVQConfig()
NUM_UNITS = 32
# Measured on HELD_OUT_TEXT (tokenizer seed 0): 10.0 dB for en-us+m3 and 14.1 dB for en-us+f3,
# against 17.5 / 16.6 dB when every frame is the mean unit frame and 6.4 / 6.7 dB for the
# unquantized mel spectrogram through the same Griffin-Lim. The female voice is far from the two
# male training voices, and units do not carry the speaker.
LSD_BOUND_DB = {"en-us+m3": 11.5, "en-us+f3": 15.5}


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Training clips from two male voices (22.05 kHz) and the held-out sentence by two other voices."""
    tmp = tmp_path_factory.mktemp("speech")
    train = training_speech(tmp)
    held_out = {voice: speak(HELD_OUT_TEXT, voice, tmp / f"held_out_{voice}.wav") for voice in LSD_BOUND_DB}
    return train, held_out


@pytest.fixture(scope="module")
def tokenizer(speech):
    return train_phonetic_tokenizer(speech[0], FeatureConfig(kind="mfcc"), NUM_UNITS, seed=0)


@pytest.fixture(scope="module")
def vocoder(tokenizer, speech):
    return train_unit_vocoder(tokenizer, speech[0], CFG)


@pytest.fixture(scope="module")
def held_out_units(tokenizer, speech):
    return {voice: tokenizer.centroids.assign(tokenizer.frames(wave, rate))
            for voice, (wave, rate) in speech[1].items()}


def test_api_and_output_length(vocoder, held_out_units):
    assert (vocoder.sample_rate, vocoder.frame_rate, vocoder.num_units) == (16000, 50.0, NUM_UNITS)
    assert vocoder.mels_um.shape == (NUM_UNITS, CFG.n_mels) and np.all(np.isfinite(vocoder.mels_um))
    units = held_out_units["en-us+m3"]
    wave = vocoder.decode(units)
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.all(np.isfinite(wave))
    assert abs(wave.size - units.size * CFG.hop) <= CFG.hop
    assert vocoder.decode(np.zeros(0, np.int32)).size == 0


@pytest.mark.parametrize("voice", sorted(LSD_BOUND_DB))
def test_vocoded_unseen_voice_is_close_to_the_original(vocoder, speech, held_out_units, voice):
    wave, rate = speech[1][voice]
    ref = resample(wave, rate, CFG.sample_rate)
    vocoded = log_spectral_distance(ref, vocoder.decode(held_out_units[voice]), CFG.sample_rate)
    frames = codec_frames(wave, rate, CFG)
    unquantized = log_spectral_distance(ref, mel_to_wave(frames, CFG), CFG.sample_rate)
    flat = np.broadcast_to(vocoder.mels_um.mean(axis=0), frames.shape)  # units carry no information
    no_units = log_spectral_distance(ref, mel_to_wave(flat, CFG), CFG.sample_rate)
    assert unquantized < vocoded < LSD_BOUND_DB[voice]
    assert vocoded < no_units - 1.0


def test_decoding_is_deterministic(vocoder, held_out_units):
    units = held_out_units["en-us+f3"][:100]
    np.testing.assert_array_equal(vocoder.decode(units), vocoder.decode(units.copy()))


def test_save_load_round_trip(vocoder, held_out_units, tmp_path):
    vocoder.save(tmp_path / "vocoder")
    assert sorted(p.name for p in (tmp_path / "vocoder").iterdir()) == ["unit_mels.npz", "unit_vocoder.json"]
    loaded = UnitVocoder.load(tmp_path / "vocoder")
    assert (loaded.cfg, loaded.smoothing, loaded.frame_rate) == \
        (vocoder.cfg, vocoder.smoothing, vocoder.frame_rate)
    units = held_out_units["en-us+m3"][:100]
    np.testing.assert_array_equal(loaded.decode(units), vocoder.decode(units))
    (tmp_path / "vocoder" / "unit_vocoder.json").write_text('{"format": 99}')
    with pytest.raises(CheckpointError):
        UnitVocoder.load(tmp_path / "vocoder")
    with pytest.raises(CheckpointError):
        UnitVocoder.load(tmp_path / "missing")


def test_unseen_units_get_the_global_mean(tokenizer, speech):
    """A center no frame is near: its unit never occurs in training, and renders as the mean frame."""
    far = np.full((1, tokenizer.centroids.dim), 1e4, np.float32)
    centers = np.vstack([tokenizer.centroids.centers_kd, far])
    extended = PhoneticTokenizer(tokenizer.encoder, Centroids(centers))
    clips = speech[0][:4]
    vocoder = train_unit_vocoder(extended, clips, CFG)
    assert vocoder.num_units == NUM_UNITS + 1
    pooled = []
    for wave, rate in clips:
        n = min(extended.frames(wave, rate).shape[0], codec_frames(wave, rate, CFG).shape[0])
        pooled.append(codec_frames(wave, rate, CFG)[:n])
    np.testing.assert_allclose(vocoder.mels_um[NUM_UNITS], np.concatenate(pooled).mean(axis=0), atol=1e-4)
    wave = vocoder.decode(np.full(50, NUM_UNITS))
    assert wave.size == 49 * CFG.hop and np.all(np.isfinite(wave)) and np.abs(wave).max() > 0


def test_unit_mean_frames():
    frames = np.arange(12, dtype=np.float32).reshape(6, 2)
    means, counts = unit_mean_frames(np.array([0, 0, 2, 2, 2, 0]), frames, 4)
    np.testing.assert_allclose(means[0], frames[[0, 1, 5]].mean(axis=0))
    np.testing.assert_allclose(means[2], frames[2:5].mean(axis=0))
    np.testing.assert_allclose(means[1], frames.mean(axis=0))  # unseen: the global mean
    np.testing.assert_allclose(means[3], frames.mean(axis=0))
    assert counts.tolist() == [3, 0, 3, 0]


def test_bad_unit_ids_raise(vocoder):
    with pytest.raises(VocabError, match=r"unit id 32 .*0\.\.31"):
        vocoder.decode(np.array([0, 5, 32, 1]))
    with pytest.raises(VocabError, match=r"unit id -1 .*0\.\.31"):
        vocoder.decode(np.array([-1, 0]))
    with pytest.raises(VocabError, match="integers"):
        vocoder.decode(np.array([0.0, 1.0]))
    with pytest.raises(VocabError, match="1-D"):
        vocoder.decode(np.zeros((2, 10), np.int32))


def test_other_unit_frame_rates_are_resampled_to_the_mel_timeline():
    """25 Hz units on the 50 Hz mel timeline: each mel frame takes the unit nearest in time."""
    mels = np.stack([np.full(CFG.n_mels, -3.0 - u, np.float32) for u in range(3)])
    vocoder = UnitVocoder(mels, CFG, unit_frame_rate=25.0)
    frames = vocoder.mel_frames(np.array([0, 1, 2]))
    np.testing.assert_array_equal(frames[:, 0], mels[[0, 1, 1, 2, 2, 2], 0])
    units = np.tile([0, 1, 2], 20)
    assert abs(vocoder.decode(units).size - units.size * CFG.sample_rate / 25.0) <= CFG.sample_rate / 25.0


def test_smoothing_and_config_checks():
    mels = np.stack([np.full(CFG.n_mels, -2.0, np.float32), np.full(CFG.n_mels, -6.0, np.float32)])
    smoothed = UnitVocoder(mels, CFG, smoothing=3).mel_frames(np.array([0, 0, 1, 1]))[:, 0]
    np.testing.assert_allclose(smoothed, [-2.0, -3.0, -5.0, -6.0])  # weights 1/4, 1/2, 1/4
    np.testing.assert_array_equal(UnitVocoder(mels, CFG).mel_frames(np.array([0, 1]))[:, 0], [-2.0, -6.0])
    for bad in (0, 2, 1.5):
        with pytest.raises(ConfigError, match="smoothing"):
            UnitVocoder(mels, CFG, smoothing=bad)
    with pytest.raises(ConfigError, match="n_mels"):
        UnitVocoder(mels[:, :10], CFG)
