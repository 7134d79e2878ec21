"""The speech encoder inside the model (`model.speech_input.encoder: ctc`): packed utterances
encode as they would alone, a frozen encoder hears what the feature cache holds, weights load
from a saved recognizer, and the model trains on log-mel shards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slm.config import SpeechInputConfig, load_config
from slm.data.prepare import tokenize_corpus
from slm.data.source import with_speech_input
from slm.errors import CheckpointError, ConfigError, DataError
from slm.model.speech_encoder import RecognizerEncoder, build_speech_encoder, pretrained_encoder
from slm.model.speech_input import frames_per_step
from slm.speech.ctc_units import CTCFrameEncoder
from slm.speech.recognizer import (FEATURES, Recognizer, RecognizerConfig, _conv, encode,
                                   init_params, log_mel)
from slm.train.trainer import train
from tests.conftest import REPO

SMALL = RecognizerConfig(d=32, layers=1, heads=2)
ENCODER = ["strategy.user_input=features", "model.speech_input.projector_options={k: 2}",
           "model.speech_input.encoder=ctc",
           "model.speech_input.encoder_options={d: 32, layers: 1, heads: 2}"]


@pytest.mark.parametrize("stride", [1, 2])
def test_run_aware_convolution_is_xla_same_convolution_of_one_utterance(stride):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 64, 6)), jnp.float32)
    w, b = jnp.asarray(rng.normal(size=(5, 6, 4)), jnp.float32), jnp.asarray(rng.normal(size=4), jnp.float32)
    runs = jnp.asarray(np.arange(64)[None] < 50, jnp.int32)
    reference = jax.nn.gelu(jax.lax.conv_general_dilated(
        x * runs[..., None], w, (stride,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")) + b)
    inside = np.asarray(runs[0, ::stride]) > 0
    np.testing.assert_allclose(np.asarray(_conv(x, w, b, runs, stride))[0, inside],
                               np.asarray(reference)[0, inside], atol=1e-5)


def test_utterances_packed_in_one_row_encode_as_each_alone():
    params = init_params(SMALL, 0)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, FEATURES.dim)), rng.normal(size=(14, FEATURES.dim))
    row = np.zeros((1, 40, FEATURES.dim), np.float32)
    runs = np.zeros((1, 40), np.int32)
    row[0, :20], runs[0, :20] = a, 1
    row[0, 22:36], runs[0, 22:36] = b, 2  # both start on even frames
    packed = np.asarray(encode(params, jnp.asarray(row), jnp.asarray(runs), SMALL))[0]
    for x, start, frames in ((a, 0, 20), (b, 22, 14)):
        alone = np.zeros((1, 64, FEATURES.dim), np.float32)
        alone[0, :frames] = x
        mask = (np.arange(64) < frames)[None].astype(np.int32)
        states = np.asarray(encode(params, jnp.asarray(alone), jnp.asarray(mask), SMALL))[0]
        n = (frames + 1) // 2
        np.testing.assert_allclose(packed[start // 2:start // 2 + n], states[:n], atol=1e-5)


def _encoder_with(params) -> RecognizerEncoder:
    encoder = RecognizerEncoder(SMALL, nnx.Rngs(0))
    for key in encoder.weights:
        encoder.weights[key][...] = jnp.asarray(params[key.replace("_", ".")])
    return encoder


def test_a_frozen_in_model_encoder_hears_what_the_feature_cache_holds():
    """The cache path (the unit encoder run at tokenize time) and the in-model path give the
    projector the same frames, laid out in steps behind a text prefix as a grid carries them."""
    params = init_params(SMALL, 0)
    t = np.arange(int(0.77 * 16000)) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    cached = CTCFrameEncoder(Recognizer(params, SMALL), "unit_encoder")(wave)
    mels = log_mel(wave, 16000)
    assert mels.shape == (len(cached), FEATURES.dim)
    w, before = 4, 3  # frames per step; steps of text before the user's speech
    steps = before + -(-len(mels) // w) + 2
    frames = np.zeros((1, steps * w, FEATURES.dim), np.float32)
    mask = np.zeros((1, steps * w), bool)
    frames[0, before * w:before * w + len(mels)], mask[0, before * w:before * w + len(mels)] = mels, True
    heard = _encoder_with(params)(jnp.asarray(frames.reshape(1, steps, w, -1)),
                                  jnp.asarray(mask.reshape(1, steps, w)))
    np.testing.assert_allclose(np.asarray(heard).reshape(steps * w, -1)[mask[0]], cached, atol=1e-4)


def test_weights_load_from_a_saved_recognizer_and_mismatches_are_named(tmp_path):
    params = init_params(SMALL, 3)
    Recognizer(params, SMALL).save(tmp_path, "encoder")
    cfg = SpeechInputConfig(dim=FEATURES.dim, encoder="ctc", encoder_dir=str(tmp_path),
                            encoder_options={"d": 32, "layers": 1, "heads": 2})
    loaded = pretrained_encoder(cfg)
    assert "out_w" not in loaded  # the character layer is not part of the encoder
    np.testing.assert_array_equal(loaded["l0_qkv_b"], np.asarray(params["l0.qkv.b"]))
    with pytest.raises(CheckpointError, match="encoder_options give d=16"):
        pretrained_encoder(dataclasses.replace(cfg, encoder_options={"d": 16, "layers": 1, "heads": 2}))
    with pytest.raises(CheckpointError, match="lacks encoder.json, encoder.npz"):
        pretrained_encoder(dataclasses.replace(cfg, encoder_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="encoder_options has \\['width'\\]"):
        pretrained_encoder(dataclasses.replace(cfg, encoder_options={"width": 3}))
    with pytest.raises(ConfigError, match="even number of frames per step"):
        frames_per_step(dataclasses.replace(cfg, projector_options={"k": 3}))
    with pytest.raises(ConfigError, match="choose '' .* or one of ctc"):
        build_speech_encoder(dataclasses.replace(cfg, encoder="whisper"), nnx.Rngs(0))


@pytest.fixture(scope="module")
def log_mel_shards(prepared, tmp_path_factory):
    root, _ = prepared
    out = tmp_path_factory.mktemp("log_mel") / "shards"
    summary = tokenize_corpus(root / "corpus", root / "tok", out, workers=1, progress=False,
                              features="log_mel")
    return root, out, summary


def _config(root, shards, *overrides):
    return load_config(f"{REPO}/configs/tiny/spoken.yaml", [
        "strategy.name=chain_of_modality", f"tokenizers.dir={root / 'tok'}", f"data.dir={shards}",
        "model.d_model=32", "model.num_layers=1", "model.mlp_dim=64", "data.seq_len=128",
        "data.batch_size=4", *ENCODER, *overrides])


def test_the_model_trains_its_encoder_on_log_mel_shards(log_mel_shards, single_mesh, tmp_path):
    root, shards, summary = log_mel_shards
    assert summary["train-dialogues"]["features"] == "log_mel"
    assert summary["train-dialogues"]["feature_dim"] == FEATURES.dim
    params = init_params(SMALL, 5)
    Recognizer(params, SMALL).save(tmp_path, "encoder")
    config = _config(root, shards, "train.steps=2", f"model.speech_input.encoder_dir={tmp_path}")
    result = train(config, mesh=single_mesh, progress=False)
    assert all(np.isfinite(h["loss"]) and h["invalid_targets"] == 0 for h in result.history)
    trained = result.state.params["speech_encoder"]["weights"]
    moved = np.abs(np.asarray(trained["conv1_w"]) - np.asarray(params["conv1.w"])).max()
    assert 0 < moved < 0.1  # started from the saved recognizer, then trained with the model


def test_states_shards_and_an_in_model_encoder_are_refused_by_name(prepared, log_mel_shards):
    root, shards, _ = log_mel_shards
    with pytest.raises(DataError, match="tokenizers.features=log_mel"):
        with_speech_input(_config(root, root / "shards"))
    no_encoder = _config(root, shards, "model.speech_input.encoder=")
    with pytest.raises(DataError, match="set model.speech_input.encoder=ctc"):
        with_speech_input(no_encoder)
