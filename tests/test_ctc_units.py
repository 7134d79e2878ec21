"""Supervised units: a CTC recognizer's states as frames, on the 50 Hz timeline, saved and
reloaded with the other tokenizers."""

import dataclasses

import numpy as np
import pytest

from slm.data.prepare import corpus_transcribed, train_corpus_tokenizers
from slm.data.tokenizers import TokenizerSet, train_tokenizers
from slm.errors import ConfigError
from slm.speech.ctc_units import CTCFrameEncoder
from slm.speech.features import FeatureConfig, LibrosaFrames
from tests.conftest import TOKENIZERS

CTC = dataclasses.replace(TOKENIZERS, unit_features="ctc", unit_encoder_steps=3)


@pytest.fixture(scope="module")
def ctc_tokenizers(prepared, tmp_path_factory):
    root, _ = prepared
    out = tmp_path_factory.mktemp("ctc_tok")
    return train_corpus_tokenizers(CTC, root / "corpus", out), out, root / "corpus"


def test_frames_sit_on_the_shared_50hz_timeline(ctc_tokenizers):
    tokenizers, _, corpus = ctc_tokenizers
    assert isinstance(tokenizers.units.encoder, CTCFrameEncoder)
    waves, _ = corpus_transcribed(corpus)
    mfcc = LibrosaFrames(FeatureConfig(kind="mfcc", frame_rate=50.0))
    for wave in waves[:3]:
        frames = tokenizers.units.frames(wave, 16000)
        assert frames.shape == (mfcc(wave).shape[0], tokenizers.units.encoder.recognizer.cfg.d)
        # 25 Hz states, each repeated twice
        np.testing.assert_array_equal(frames[0:-1:2], frames[1::2][:len(frames[0:-1:2])])
        assert len(tokenizers.codec.encode(wave, 16000)[0]) == frames.shape[0]


def test_saved_tokenizers_reload_and_give_the_same_units(ctc_tokenizers):
    tokenizers, out, corpus = ctc_tokenizers
    reloaded = TokenizerSet.load(out)
    waves, _ = corpus_transcribed(corpus)
    for wave in waves[:3]:
        np.testing.assert_array_equal(reloaded.units.encode(wave, 16000),
                                      tokenizers.units.encode(wave, 16000))
    reloaded.vocab().check_compatible(tokenizers.vocab(), str(out))


def test_ctc_units_need_transcribed_speech(tmp_path):
    wave = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    with pytest.raises(ConfigError, match="transcribed speech"):
        train_tokenizers(CTC, ["a b c"] * 50, [(wave, 16000)], tmp_path)
