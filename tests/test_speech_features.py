"""Hearing the user as encoder frames (`strategy.user_input: features`): layout, packing,
the model's projected input, training, and the KV-cache sampler's prefill."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slm.config import ModelConfig, SpeechInputConfig, StreamConfig, load_config
from slm.data.source import make_source, with_speech_input
from slm.errors import ConfigError, DataError
from slm.model import SpeechLM
from slm.model.speech_input import frames_per_step
from slm.reply import load_speaker
from slm.strategies import NAMES, make_strategy
from slm.strategies.hearing import AUDIO_TOKEN, Hearing, frame_groups
from slm.train.trainer import train, vocab_from_config
from slm.types import Segment
from slm.vocab import Vocab
from tests.conftest import REPO

FEATURES = ["strategy.user_input=features", "model.speech_input.projector_options={k: 2}"]
USER_CODES_OFF = {"coarse_to_fine": ["strategy.options.user_codes=false"]}


def _config(root, strategy, *overrides):
    return load_config(f"{REPO}/configs/tiny/spoken.yaml", [
        f"strategy.name={strategy}", f"tokenizers.dir={root / 'tok'}", f"data.dir={root / 'shards'}",
        "model.d_model=32", "model.num_layers=1", "model.mlp_dim=64", "data.seq_len=128",
        "data.batch_size=4", *FEATURES, *USER_CODES_OFF.get(strategy, []), *overrides])


def _vocab() -> Vocab:
    return Vocab.build(text_size=12, num_units=8, num_codebooks=2, codebook_size=4)


def _dialogue(vocab: Vocab, frames: int, dim: int = 3) -> list[Segment]:
    rng = np.random.default_rng(0)
    codes = np.stack([vocab.codebook_id(q, rng.integers(0, 4, 6)) for q in range(2)])
    question = Segment("user", "speech", text=vocab.text_id(np.array([1, 2])),
                       units=vocab.unit_id(rng.integers(0, 8, 9)), codes=codes,
                       features=rng.normal(size=(frames, dim)).astype(np.float32))
    answer = Segment("assistant", "speech", text=vocab.text_id(np.array([3, 4])),
                     word_ends=np.array([1, 2], np.int32),
                     units=vocab.unit_id(np.array([1, 1, 2, 3])), codes=codes)
    return [question, answer]


def test_frames_group_into_steps_with_the_last_one_padded():
    frames = np.arange(10, dtype=np.float32).reshape(5, 2)
    groups, mask = frame_groups(frames, 2)
    assert groups.shape == (3, 2, 2) and mask.tolist() == [[True, True], [True, True], [True, False]]
    np.testing.assert_array_equal(groups.reshape(-1, 2)[:5], frames)


@pytest.mark.parametrize("name", NAMES)
def test_every_strategy_lays_out_heard_frames_where_its_units_would_be(name):
    vocab = _vocab()
    options = {"user_codes": False} if name == "coarse_to_fine" else {}
    strategy = make_strategy(dataclasses.replace(load_config(None).strategy, name=name,
                                                 options=options), vocab)
    hearing = Hearing("features", frames_per_step=2, feature_dim=3)
    segments = _dialogue(vocab, frames=7)
    heard = [hearing.heard(segments[0], vocab), segments[1]]
    assert heard[0].units.tolist() == [vocab.special(AUDIO_TOKEN)] * 4  # ceil(7 / 2) steps
    grid = hearing.attach(strategy.layout(heard, vocab), heard, vocab)
    steps = np.flatnonzero((grid.tokens == vocab.special(AUDIO_TOKEN)).any(0))
    assert len(steps) == 4 and grid.features.shape == (grid.steps, 2, 3)
    np.testing.assert_array_equal(grid.features[steps].reshape(8, 3)[:7], segments[0].features)
    assert grid.feature_mask.sum() == 7 and grid.feature_mask[steps].sum() == 7
    assert not np.any(grid.weights[:, steps])  # what the user says is never a target
    prompt = hearing.attach(strategy.prompt(heard[:1], vocab), heard[:1], vocab)
    np.testing.assert_array_equal(prompt.features, grid.features[:prompt.steps])


def test_frames_of_the_wrong_width_and_missing_frames_are_named_errors():
    vocab = _vocab()
    hearing = Hearing("features", frames_per_step=2, feature_dim=5)
    question = _dialogue(vocab, frames=4, dim=3)[0]
    with pytest.raises(DataError, match=r"\[frames, 5\].*model.speech_input.dim"):
        hearing.heard(question, vocab)
    with pytest.raises(DataError, match="cache_features"):
        hearing.heard(dataclasses.replace(question, features=None), vocab)
    with pytest.raises(ConfigError, match="user_input='frames'"):
        Hearing("frames")


def test_coarse_to_fine_hearing_user_codes_refuses_features_by_name():
    vocab = _vocab()
    strategy = make_strategy(dataclasses.replace(load_config(None).strategy, name="coarse_to_fine"),
                             vocab)
    hearing = Hearing("features", frames_per_step=2, feature_dim=3)
    heard = hearing.heard(_dialogue(vocab, frames=4)[0], vocab)
    with pytest.raises(ConfigError, match="user_codes=false"):
        strategy.prompt([heard], vocab)


def test_a_projector_window_that_is_no_whole_step_is_refused():
    cfg = SpeechInputConfig(dim=4, projector="qformer",
                            projector_options={"window": 5, "queries": 2, "hidden": 8, "heads": 2})
    with pytest.raises(ConfigError, match="whole number of frames"):
        frames_per_step(cfg)
    assert frames_per_step(SpeechInputConfig(dim=4, projector_options={"k": 3})) == 3
    assert frames_per_step(SpeechInputConfig(dim=4, projector="conv_mlp",
                                             projector_options={"frames_per_output": 4})) == 4


def _model(dim: int = 3) -> tuple[SpeechLM, Vocab]:
    vocab = _vocab()
    cfg = ModelConfig(d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      mlp_dim=32, streams=[StreamConfig("tokens", ["specials", "text", "units"])],
                      speech_input=SpeechInputConfig(dim=dim, projector_options={"k": 2}))
    return SpeechLM(cfg, vocab, nnx.Rngs(0)), vocab


def _prompt(vocab: Vocab, steps: int = 6, dim: int = 3):
    audio = vocab.special(AUDIO_TOKEN)
    tokens = np.array([[vocab.bos_id, audio, audio, audio, vocab.eos_id, vocab.text_id(2)][:steps]])
    rng = np.random.default_rng(1)
    features = np.zeros((1, steps, 2, dim), np.float32)
    mask = np.zeros((1, steps, 2), bool)
    features[0, 1:4] = rng.normal(size=(3, 2, dim))
    mask[0, 1:4] = True
    return jnp.asarray(tokens[:, None]), (jnp.asarray(features), jnp.asarray(mask))


def test_the_model_hears_frames_only_where_the_mask_says():
    model, vocab = _model()
    tokens, (features, mask) = _prompt(vocab)
    plain = model(tokens).temporal[0]
    silent = model(tokens, features=(features, jnp.zeros_like(mask))).temporal[0]
    heard = model(tokens, features=(features, mask)).temporal[0]
    np.testing.assert_allclose(silent, plain, atol=1e-6)  # masked frames never reach the model
    np.testing.assert_allclose(heard[:, 0], plain[:, 0], atol=1e-6)  # causal: before the frames
    assert np.abs(np.asarray(heard[:, 1:] - plain[:, 1:])).max() > 1e-3


def test_prefill_with_frames_matches_the_training_forward():
    model, vocab = _model()
    tokens, features = _prompt(vocab)
    full = model(tokens, features=features).temporal[0]
    state = model.init_decode_state(1, 16)
    _, logits, _ = model.decode(tokens, state, features=features)
    np.testing.assert_allclose(logits[0], full, atol=2e-5)


def test_frames_of_the_wrong_width_reach_the_model_as_a_named_error():
    model, vocab = _model(dim=3)
    tokens, (features, mask) = _prompt(vocab, dim=5)
    with pytest.raises(DataError, match="width 5.*model.speech_input.dim"):
        model(tokens, features=(features, mask))


@pytest.mark.parametrize("strategy", NAMES)
def test_packed_batches_keep_frames_beside_their_placeholders(prepared, strategy):
    root, _ = prepared
    config = with_speech_input(_config(root, strategy))
    vocab = vocab_from_config(config)
    assert config.model.speech_input.dim > 0  # from the cached frames in the shards
    batch = next(iter(make_source(config, vocab)))
    placeholder = (batch["tokens"] == vocab.special(AUDIO_TOKEN)).any(axis=1)  # [B, T]
    assert placeholder.any()
    np.testing.assert_array_equal(batch["feature_mask"].any(axis=-1), placeholder)
    assert batch["features"].shape == (*placeholder.shape, 2, config.model.speech_input.dim)
    assert np.all(batch["features"][~batch["feature_mask"]] == 0)


@pytest.mark.parametrize("strategy", NAMES)
def test_every_strategy_trains_hearing_features(prepared, strategy, single_mesh):
    root, _ = prepared
    result = train(_config(root, strategy, "train.steps=3"), mesh=single_mesh, progress=False)
    assert all(h["invalid_targets"] == 0 and np.isfinite(h["loss"]) for h in result.history)
    projector = nnx.state(result.plan.model(result.state.params).speech_input, nnx.Param)
    assert jax.tree.leaves(projector)  # the projector is part of the trained parameters


def test_sharded_training_with_features_matches_one_device(prepared, single_mesh):
    root, _ = prepared
    one = train(_config(root, "parallel", "train.steps=2"), mesh=single_mesh, progress=False)
    eight = train(_config(root, "parallel", "train.steps=2", "mesh.ici={data: 2, fsdp: 2, tensor: 2}"),
                  progress=False)
    assert len(eight.plan.mesh.devices.flat) == 8
    np.testing.assert_allclose([h["loss"] for h in eight.history],
                               [h["loss"] for h in one.history], rtol=1e-4)


def test_shards_without_cached_frames_are_refused_by_name(prepared, tmp_path):
    root, _ = prepared
    index = (root / "shards" / "train-dialogues.json").read_text()
    (tmp_path / "train-dialogues.json").write_text(index.replace('"feature_dim"', '"was_dim"'))
    config = _config(root, "parallel", f"data.dir={tmp_path}")
    with pytest.raises(DataError, match="cache_features=true"):
        with_speech_input(config)
    with pytest.raises(DataError, match="model.speech_input.dim=7"):
        with_speech_input(_config(root, "parallel", "model.speech_input.dim=7"))


def test_a_features_model_replies_to_a_spoken_question(prepared, tmp_path, single_mesh):
    import json

    from slm.speech.audio import load_audio

    root, _ = prepared
    train(_config(root, "chain_of_modality", "train.steps=2", f"checkpoint.dir={tmp_path}"),
          mesh=single_mesh, progress=False)
    speaker = load_speaker(tmp_path, mesh=single_mesh, max_steps=8, greedy=True)
    utt = json.loads((root / "corpus" / "heldout" / "utterances.jsonl").read_text().splitlines()[0])
    user = speaker.hear(load_audio(root / "corpus" / utt["audio"], 16000), 16000)
    assert user.features is not None and speaker.hearing.features
    prompt = speaker.prompt([user])
    assert prompt.feature_mask.sum() == len(user.features)
    one, two = (speaker.reply([user], jax.random.key(0)) for _ in range(2))
    assert one.steps > 0 and one.grid.tokens.tolist() == two.grid.tokens.tolist()
