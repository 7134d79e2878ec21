"""transformers speech models behind slm's protocols, on tiny random models saved to tmp dirs."""

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may reach the hub

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from slm.errors import AudioError, ConfigError, VocabError  # noqa: E402
from slm.speech.hf_encoders import HFCodec, HFFrameEncoder  # noqa: E402

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Two convolutions of strides 5 and 4: 16000 / 20 = 800 frames per second, receptive field 46.
SSL_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
# 8 kHz codecs with a hop of 16 samples (Mimi adds a stride-2 downsample): 500 and 250 Hz.
CODEC_SMALL = dict(hidden_size=16, num_filters=4, upsampling_ratios=[4, 4], codebook_size=64, codebook_dim=16,
                   sampling_rate=8000)


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hubert")
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(path)
    return save(transformers.HubertModel(transformers.HubertConfig(**SSL_SMALL)), path)


@pytest.fixture(scope="module")
def wavlm_dir(tmp_path_factory) -> str:
    config = transformers.WavLMConfig(**SSL_SMALL, num_buckets=16, max_bucket_distance=64)
    return save(transformers.WavLMModel(config), tmp_path_factory.mktemp("wavlm"))


@pytest.fixture(scope="module")
def mimi_dir(tmp_path_factory) -> str:
    config = transformers.MimiConfig(
        **CODEC_SMALL, num_quantizers=4, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, vector_quantization_hidden_dimension=16, upsample_groups=16,
        sliding_window=16, max_position_embeddings=512)
    return save(transformers.MimiModel(config), tmp_path_factory.mktemp("mimi"))


@pytest.fixture(scope="module")
def encodec_dir(tmp_path_factory) -> str:
    # one codebook carries log2(64) bits * 500 Hz = 3 kbps, so these bandwidths give 1, 2 and 4 codebooks
    config = transformers.EncodecConfig(**CODEC_SMALL, num_lstm_layers=1, target_bandwidths=[3.0, 6.0, 12.0])
    return save(transformers.EncodecModel(config), tmp_path_factory.mktemp("encodec"))


# --- frame encoders -------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["hubert_dir", "wavlm_dir"])
def test_frame_encoder_shape_follows_frame_rate(request, which):
    encoder = HFFrameEncoder(request.getfixturevalue(which), layer=1)
    assert encoder.sample_rate == 16000 and encoder.frame_rate == 800.0
    feats = encoder(noise(0.5, 16000))
    assert feats.dtype == np.float32 and feats.shape[1] == 32
    assert abs(feats.shape[0] - encoder.frame_rate * 0.5) <= 1


def test_real_front_end_gives_50_hz(tmp_path):
    """HuBERT's own conv layout (total stride 320) with tiny channels: 1 s of audio is 49 frames."""
    config = transformers.HubertConfig(**{**SSL_SMALL, "conv_dim": (8,) * 7, "conv_stride": (5,) + (2,) * 6,
                                          "conv_kernel": (10,) + (3,) * 4 + (2,) * 2})
    encoder = HFFrameEncoder(save(transformers.HubertModel(config), tmp_path), layer=2)
    assert encoder.frame_rate == 50.0
    assert encoder(noise(1.0, 16000)).shape == (49, 32)


def test_frame_encoder_layers_differ_and_all_are_valid(hubert_dir):
    wave = noise(0.2, 16000)
    outputs = [HFFrameEncoder(hubert_dir, layer=layer)(wave) for layer in (0, 1, 2)]
    assert not np.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize("layer", [-1, 3, 1.0])
def test_frame_encoder_layer_out_of_range(hubert_dir, layer):
    with pytest.raises(ConfigError, match=r"layer=.*0\.\.2"):
        HFFrameEncoder(hubert_dir, layer=layer)


def test_frame_encoder_spec_round_trip(hubert_dir):
    encoder = HFFrameEncoder(hubert_dir, layer=2)
    spec = encoder.spec()
    assert spec == {"kind": "hf", "model_dir": str(encoder.model_dir), "layer": 2}
    again = HFFrameEncoder.from_spec(spec)
    assert again.spec() == spec and again.frame_rate == encoder.frame_rate
    wave = noise(0.2, 16000, seed=1)
    np.testing.assert_array_equal(again(wave), encoder(wave))


def test_frame_encoder_bad_waves(hubert_dir):
    encoder = HFFrameEncoder(hubert_dir, layer=1)
    with pytest.raises(AudioError, match="mono"):
        encoder(np.zeros((2, 1600), np.float32))
    with pytest.raises(AudioError, match="receptive field"):
        encoder(np.zeros(20, np.float32))


def test_frame_encoder_needs_a_conv_front_end(mimi_dir):
    with pytest.raises(ConfigError, match="conv_stride"):
        HFFrameEncoder(mimi_dir, layer=0)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        HFFrameEncoder(tmp_path / "absent", layer=0)
    with pytest.raises(ConfigError, match="no config.json"):
        HFCodec(tmp_path / "absent")


# --- codecs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which, frame_rate", [("mimi_dir", 250.0), ("encodec_dir", 500.0)])
def test_codec_round_trip_shapes(request, which, frame_rate):
    codec = HFCodec(request.getfixturevalue(which))
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (8000, frame_rate, 4, 64)
    codes = codec.encode(noise(0.25, 16000), sample_rate=16000)  # resampled to 8 kHz first
    assert codes.dtype == np.int32 and codes.shape[0] == 4
    assert abs(codes.shape[1] - frame_rate * 0.25) <= 1
    assert codes.min() >= 0 and codes.max() < codec.codebook_size
    wave = codec.decode(codes)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 0.25 * codec.sample_rate) <= codec.sample_rate / frame_rate


@pytest.mark.parametrize("which, num_codebooks", [("mimi_dir", 3), ("encodec_dir", 2)])
def test_codec_fewer_codebooks(request, which, num_codebooks):
    codec = HFCodec(request.getfixturevalue(which), num_codebooks=num_codebooks)
    codes = codec.encode(noise(0.1, 8000), sample_rate=8000)
    assert codes.shape[0] == num_codebooks
    assert codec.decode(codes).size > 0
    assert codec.spec()["num_codebooks"] == num_codebooks


@pytest.mark.parametrize("which, num_codebooks", [("mimi_dir", 5), ("encodec_dir", 3), ("encodec_dir", 8)])
def test_codec_unavailable_codebook_count(request, which, num_codebooks):
    with pytest.raises(ConfigError, match=f"num_codebooks={num_codebooks}"):
        HFCodec(request.getfixturevalue(which), num_codebooks=num_codebooks)


def test_codec_rejects_other_model_types(hubert_dir):
    with pytest.raises(ConfigError, match="model_type='hubert'.*mimi, encodec"):
        HFCodec(hubert_dir)


def test_codec_rejects_codes_it_cannot_decode(mimi_dir):
    codec = HFCodec(mimi_dir)
    with pytest.raises(VocabError, match=r"\[4, T\]"):
        codec.decode(np.zeros((3, 5), np.int32))
    with pytest.raises(VocabError, match=r"\[0, 64\)"):
        codec.decode(np.full((4, 5), 64, np.int32))
    with pytest.raises(AudioError, match="mono"):
        codec.encode(np.zeros(0, np.float32), sample_rate=8000)


# --- without torch ----------------------------------------------------------------------------

def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_slm_imports_without_torch():
    """A None entry in sys.modules makes any `import torch` raise, as on a machine without it."""
    done = run_python("import sys; sys.modules['torch'] = None\nimport slm.speech.hf_encoders, slm.text")
    assert done.returncode == 0, done.stderr


def test_missing_torch_says_how_to_install(hubert_dir):
    done = run_python("import sys; sys.modules['torch'] = None\n"
                      "from slm.speech.hf_encoders import HFFrameEncoder\n"
                      f"HFFrameEncoder({hubert_dir!r}, layer=0)")
    assert "MissingToolError" in done.stderr and "pip install torch==2.13.0" in done.stderr
