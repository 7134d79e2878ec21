"""The conv unit vocoder: it learns one voice's frames from unit context, keeps the codec's
length convention, reloads identically and is what a tokenizer set with `unit_vocoder: conv`
loads back."""

import dataclasses

import numpy as np
import pytest

from slm.data.tokenizers import TokenizerSet, load_unit_vocoder, train_tokenizers
from slm.errors import DataError
from slm.speech.codec import RVQConfig, codec_frames
from slm.speech.conv_vocoder import ConvUnitVocoder, ConvVocoderConfig, train_conv_vocoder
from slm.speech.features import FeatureConfig
from slm.speech.units import train_phonetic_tokenizer
from tests.conftest import TOKENIZERS
from tests.test_codec import training_speech  # the codec tests' speech

QUICK = ConvVocoderConfig(d=32, steps=60, batch=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    clips = training_speech(tmp_path_factory.mktemp("speech"))
    tokenizer = train_phonetic_tokenizer(clips, FeatureConfig(kind="mfcc"), 16, seed=0)
    return tokenizer, clips, train_conv_vocoder(tokenizer, clips, cfg=QUICK)


def _l1(vocoder, tokenizer, wave, rate) -> float:
    units = tokenizer.centroids.assign(tokenizer.frames(wave, rate))
    target = codec_frames(wave, rate, RVQConfig())
    n = min(len(units), len(target))
    return float(np.abs(vocoder.mel_frames(units[:n]) - target[:n]).mean())


def test_training_lowers_the_mel_error_below_an_untrained_net(trained):
    tokenizer, clips, vocoder = trained
    untrained = train_conv_vocoder(tokenizer, clips, cfg=dataclasses.replace(QUICK, steps=0))
    wave, rate = clips[0]
    assert _l1(vocoder, tokenizer, wave, rate) < 0.7 * _l1(untrained, tokenizer, wave, rate)


def test_decode_length_follows_the_codec_convention(trained):
    _, _, vocoder = trained
    units = np.arange(50) % vocoder.num_units
    assert vocoder.decode(units).shape == ((50 - 1) * RVQConfig().hop,)
    assert vocoder.decode(units[:1]).size == 0
    with pytest.raises(DataError, match="unit ids"):
        vocoder.mel_frames(np.array([vocoder.num_units]))


def test_save_load_gives_the_same_frames(trained, tmp_path):
    _, _, vocoder = trained
    vocoder.save(tmp_path / "vocoder")
    loaded = load_unit_vocoder(tmp_path / "vocoder")
    assert isinstance(loaded, ConvUnitVocoder)
    units = np.arange(40) % vocoder.num_units
    np.testing.assert_allclose(loaded.mel_frames(units), vocoder.mel_frames(units), atol=1e-6)


def test_a_tokenizer_set_with_a_conv_vocoder_reloads_it(trained, tmp_path):
    _, clips, _ = trained
    cfg = dataclasses.replace(TOKENIZERS, unit_vocoder="conv", unit_vocoder_steps=3,
                              unit_features="mfcc")
    texts = ["the dog runs in the park", "a cat sits near the house"] * 30
    train_tokenizers(cfg, texts, clips, tmp_path)
    assert isinstance(TokenizerSet.load(tmp_path).vocoder, ConvUnitVocoder)
