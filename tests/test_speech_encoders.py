"""slm's JAX speech encoders against transformers (torch, fp32, eval), on tiny random models."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may reach the hub

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from slm.errors import AudioError, CheckpointError, ConfigError  # noqa: E402
from slm.model.encoders import load_encoder, log_mel  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# Two convolutions of strides 5 and 4 (800 frames per second), as tests/test_hf_encoders.py.
SSL_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
# HuBERT's own conv layout (total stride 320: 50 Hz) with tiny channels.
SSL_50HZ = {**SSL_SMALL, "conv_dim": (8,) * 7, "conv_stride": (5,) + (2,) * 6,
            "conv_kernel": (10,) + (3,) * 4 + (2,) * 2}
STABLE = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
WAVLM = dict(num_buckets=16, max_bucket_distance=64)
# 50 positions: HF's required input is 100 mel frames, 1 s, so its extractor takes chunk_length=1.
WHISPER_SMALL = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     num_mel_bins=80, max_source_positions=50, max_target_positions=16,
                     vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=1)

_forward = nnx.jit(lambda encoder, x: encoder(x))


def noise(samples: int, rows: int = 1, seed: int = 0) -> np.ndarray:
    wave = 0.1 * np.random.default_rng(seed).standard_normal((rows, samples))
    return (wave + 0.3 * np.sin(np.arange(samples) * 0.05)).astype(np.float32)


def save_perturbed(model, path, *extractors) -> str:
    """Random init leaves norms at 1/0 and some biases at 0; noise on every parameter makes a
    swapped or dropped tensor show up in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    for extractor in extractors:
        extractor.save_pretrained(path)
    return str(path)


def max_diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs.detach().numpy()).max())


def hidden_diff(out, ref) -> float:
    """Largest difference over every hidden state and the last hidden state."""
    assert out.hidden_lbtd.shape[0] == len(ref.hidden_states)
    diffs = [max_diff(out.hidden_lbtd[i], h) for i, h in enumerate(ref.hidden_states)]
    return max(diffs + [max_diff(out.last_btd, ref.last_hidden_state)])


WAV2VEC = {  # name -> (model class, config class, config, wave length)
    "hubert_group": (transformers.HubertModel, transformers.HubertConfig, SSL_50HZ, 16000),
    "hubert_layer_stable": (transformers.HubertForCTC, transformers.HubertConfig,
                            {**SSL_SMALL, **STABLE}, 4000),
    "wavlm_group": (transformers.WavLMModel, transformers.WavLMConfig, {**SSL_SMALL, **WAVLM},
                    4000),
    "wavlm_layer_stable": (transformers.WavLMForCTC, transformers.WavLMConfig,
                           {**SSL_SMALL, **WAVLM, **STABLE}, 4000),
}


@pytest.fixture(scope="module")
def wav2vec_dirs(tmp_path_factory) -> dict:
    """name -> (dir, the HF base model). The stable-LN WavLM ships a do_normalize extractor, as
    the large checkpoints do."""
    dirs = {}
    torch.manual_seed(0)
    for name, (model_cls, config_cls, fields, _) in WAV2VEC.items():
        extra = {"vocab_size": 12} if model_cls.__name__.endswith("CTC") else {}
        model = model_cls(config_cls(**fields, **extra))
        extractors = ([transformers.Wav2Vec2FeatureExtractor(do_normalize=True)]
                      if name == "wavlm_layer_stable" else [])
        path = save_perturbed(model, tmp_path_factory.mktemp(name), *extractors)
        dirs[name] = (path, getattr(model, model.base_model_prefix, model))
    return dirs


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """(dir, HF WhisperEncoder, its feature extractor)."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(**WHISPER_SMALL)
    model = transformers.WhisperForConditionalGeneration(config)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    path = save_perturbed(model, tmp_path_factory.mktemp("whisper"), extractor)
    return path, model.model.encoder, extractor


# --- parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(WAV2VEC))
def test_wav2vec_parity_on_every_hidden_state(wav2vec_dirs, name):
    path, reference = wav2vec_dirs[name]
    encoder, _ = load_encoder(path)
    wave = noise(WAV2VEC[name][3], rows=2)
    with torch.no_grad():
        ref = reference(torch.from_numpy(wave), output_hidden_states=True)
    out = _forward(encoder, jnp.asarray(wave))
    diff = hidden_diff(out, ref)
    print(f"{name}: max abs diff {diff:.2e} over {out.hidden_lbtd.shape[0]} hidden states")
    assert diff <= TOL
    if not encoder.spec.normalize:  # else encode normalises first (see the next test)
        np.testing.assert_allclose(encoder.encode(wave), out.last_btd, atol=1e-6)


def test_wav2vec_encode_normalizes_as_the_feature_extractor(wav2vec_dirs):
    path, reference = wav2vec_dirs["wavlm_layer_stable"]
    encoder, _ = load_encoder(path)
    wave = 3.0 * noise(4000)[0] + 0.5
    inputs = transformers.Wav2Vec2FeatureExtractor.from_pretrained(path)(
        wave, sampling_rate=16000, return_tensors="pt").input_values
    with torch.no_grad():
        ref = reference(inputs).last_hidden_state
    assert max_diff(encoder.encode(wave), ref) <= TOL


def test_frame_rates_and_lengths(wav2vec_dirs, whisper):
    hubert, _ = load_encoder(wav2vec_dirs["hubert_group"][0])
    assert hubert.frame_rate == 50.0 and hubert.dim == 32
    assert hubert.encode(noise(16000)[0]).shape == (1, 49, 32)  # as HF: 1 s is 49 frames
    assert load_encoder(wav2vec_dirs["wavlm_group"][0])[0].frame_rate == 800.0
    encoder, _ = load_encoder(whisper[0])
    assert encoder.frame_rate == 50.0
    assert encoder.encode(noise(8000, rows=3)).shape == (3, 25, 32)  # 0.5 s, shorter than 30 s


@pytest.mark.parametrize("mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(mels):
    extractor = transformers.WhisperFeatureExtractor(feature_size=mels)
    for samples in (5920, 48077):
        wave = noise(samples, seed=samples)[0]
        ours = np.asarray(log_mel(jnp.asarray(wave[None]), mels))[0].T
        theirs = extractor(wave, sampling_rate=16000, padding="longest",
                           return_tensors="np").input_features[0]
        assert ours.shape == theirs.shape == (mels, samples // 160)
        assert np.abs(ours - theirs).max() <= TOL
    # the extractor's default: padded to 30 s, where the silence sets the floor of the range
    padded = np.pad(wave, (0, 480000 - wave.size))
    ours = np.asarray(log_mel(jnp.asarray(padded[None]), mels))[0].T
    theirs = extractor(wave, sampling_rate=16000, return_tensors="np").input_features[0]
    assert np.abs(ours - theirs).max() <= TOL


def test_whisper_parity_on_every_hidden_state(whisper):
    path, reference, extractor = whisper
    encoder, _ = load_encoder(path)
    wave = noise(16000, seed=1)[0]
    features = extractor(wave, sampling_rate=16000, return_tensors="np").input_features
    assert features.shape == (1, 80, 100)  # transformers takes exactly 2 * max_source_positions
    with torch.no_grad():
        ref = reference(torch.from_numpy(features), output_hidden_states=True)
    out = _forward(encoder, jnp.asarray(features.transpose(0, 2, 1)))
    diff = hidden_diff(out, ref)
    print(f"whisper: max abs diff {diff:.2e} over {out.hidden_lbtd.shape[0]} hidden states")
    assert diff <= TOL
    # from the wave, through slm's own front end
    assert max_diff(encoder.encode(wave), ref.last_hidden_state) <= TOL


def test_whisper_shorter_input_uses_the_first_positions(whisper):
    """transformers refuses this length; its own modules, with positions sliced, are the
    reference."""
    path, reference, extractor = whisper
    encoder, _ = load_encoder(path)
    features = extractor(noise(16000, seed=2)[0], sampling_rate=16000,
                         return_tensors="np").input_features[:, :, :37]
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        x = gelu(reference.conv2(gelu(reference.conv1(torch.from_numpy(features)))))
        x = x.permute(0, 2, 1) + reference.embed_positions.weight[:19]
        for layer in reference.layers:
            x = layer(x, None)
        ref = reference.layer_norm(x)
    assert max_diff(encoder.encode(features.transpose(0, 2, 1)), ref) <= TOL


# --- sharded load ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["wavlm_group", "whisper"])
def test_sharded_load_splits_parameters_and_keeps_outputs(wav2vec_dirs, whisper, which):
    assert len(jax.devices()) == 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()).reshape(1, 4, 2), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    path = whisper[0] if which == "whisper" else wav2vec_dirs[which][0]
    single, _ = load_encoder(path)
    sharded, stats = load_encoder(path, mesh)
    print(f"{which}: {stats.describe()}; bytes per device {stats.device_bytes}")
    assert len(stats.device_bytes) == 8
    assert stats.max_device_bytes < stats.total_bytes / 2
    assert stats.largest_read_bytes < stats.total_bytes
    wq = sharded.stack.layers.attn.wq[...]
    assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.size == wq.size // 8
    wave = noise(16000 if which == "whisper" else 4000, rows=2)
    x = single.model_inputs(jnp.asarray(wave))
    np.testing.assert_allclose(_forward(sharded, x).hidden_lbtd, _forward(single, x).hidden_lbtd,
                               atol=1e-5)


# --- refusals -------------------------------------------------------------------------------

def edited(source: str, tmp_path, file: str = "config.json", **fields) -> str:
    """A copy of the model directory `source` with `fields` set in `file`."""
    path = tmp_path / "edited"
    shutil.copytree(source, path)
    data = json.loads((path / file).read_text())
    (path / file).write_text(json.dumps({**data, **fields}))
    return str(path)


def test_missing_files(tmp_path, wav2vec_dirs):
    with pytest.raises(CheckpointError, match="config.json: no such file"):
        load_encoder(tmp_path / "absent")
    path = tmp_path / "no_weights"
    path.mkdir()
    shutil.copy(os.path.join(wav2vec_dirs["hubert_group"][0], "config.json"), path)
    with pytest.raises(CheckpointError, match="model.safetensors: no such file.*safe_serial"):
        load_encoder(path)


@pytest.mark.parametrize("which, file, fields, match", [
    ("hubert_group", "config.json", {"model_type": "llama"}, "`model_type` is 'llama'"),
    ("whisper", "config.json", {"architectures": ["WhisperForCausalLM"]}, "`architectures`"),
    ("hubert_group", "config.json", {"conv_pos_batch_norm": True}, "`conv_pos_batch_norm`"),
    ("hubert_group", "config.json", {"feat_extract_norm": "batch"}, "`feat_extract_norm`"),
    ("hubert_group", "config.json", {"hidden_act": "swish"}, "`hidden_act`"),
    ("hubert_group", "config.json", {"adapter_attn_dim": 16}, "`adapter_attn_dim`"),
    ("wavlm_group", "config.json", {"add_adapter": True}, "`add_adapter`"),
    ("wavlm_group", "config.json", {"conv_kernel": [10]}, "`conv_dim`"),
    ("whisper", "config.json", {"activation_function": "gelu_new"}, "`activation_function`"),
    ("whisper", "preprocessor_config.json", {"feature_size": 128}, "`feature_size`"),
    ("whisper", "preprocessor_config.json", {"dither": 0.01}, "`dither`"),
])
def test_unsupported_config_is_refused_by_field(wav2vec_dirs, whisper, tmp_path, which, file,
                                                fields, match):
    source = whisper[0] if which == "whisper" else wav2vec_dirs[which][0]
    with pytest.raises(ConfigError, match=match):
        load_encoder(edited(source, tmp_path, file, **fields))


def test_config_that_does_not_match_the_tensors(wav2vec_dirs, tmp_path):
    path = edited(wav2vec_dirs["wavlm_group"][0], tmp_path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="encoder.layers.2.*missing"):
        load_encoder(path)


def test_bad_audio(wav2vec_dirs, whisper):
    hubert, _ = load_encoder(wav2vec_dirs["wavlm_group"][0])
    with pytest.raises(AudioError, match="receptive field"):
        hubert.encode(np.zeros(20, np.float32))
    with pytest.raises(AudioError, match="mono"):
        hubert.encode(np.zeros((1, 2, 1600), np.float32))
    encoder, _ = load_encoder(whisper[0])
    with pytest.raises(AudioError, match="max_source_positions=50"):
        encoder.encode(noise(16400))
    with pytest.raises(AudioError, match="num_mel_bins=80"):
        encoder.encode(np.zeros((1, 100, 128), np.float32))
