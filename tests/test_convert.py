"""HF round trips: tiny random Llama / Qwen2 / Gemma models built with transformers (torch CPU),
converted into sharded slm checkpoints on 8 simulated devices, compared logit by logit, exported
back, and refused with a named field when their architecture does not convert exactly."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slm.cli import main  # noqa: E402
from slm.convert.expand import RowStats  # noqa: E402
from slm.convert.hf_config import hf_model  # noqa: E402
from slm.convert.hf_export import export_hf  # noqa: E402
from slm.convert.hf_import import import_hf  # noqa: E402
from slm.convert.tensors import TensorFiles  # noqa: E402
from slm.errors import ConfigError  # noqa: E402
from slm.train.checkpoint import load_model  # noqa: E402
from tests.conftest import one_device_mesh  # noqa: E402

VOCAB = 300
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 32}),  # head_dim != d/heads
}
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
SPEECH_YAML = "strategy: {name: parallel}\ntokenizers: {num_units: 16, num_codebooks: 2, codebook_size: 16}\n"


def _save_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> directory of a saved tiny random model whose every weight (norms and biases
    included) is perturbed away from its init, so a mis-mapped tensor cannot go unnoticed."""
    torch.manual_seed(0)
    dirs = {}
    for family, (config_cls, model_cls, extra) in FAMILIES.items():
        cfg = getattr(transformers, config_cls)(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, **extra)
        model = getattr(transformers, model_cls)(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        dirs[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(dirs[family])
        _save_tokenizer(dirs[family])
    return dirs


def hf_logits(directory) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def slm_text_logits(checkpoint, cached: bool = False) -> np.ndarray:
    """Text-stream logits over the imported text range, in HF id order (slm id - text.start),
    read back through `load_model` as `slm sample` does; other streams get "no input" (-1).
    `cached` runs the prompt through the KV-cache decode path instead of the training path."""
    model, config, vocab = load_model(checkpoint)
    text = vocab.range("text")
    tokens = np.full((IDS.shape[0], len(config.model.streams), IDS.shape[1]), -1)
    tokens[:, 0] = IDS + text.start
    if cached:
        run = lambda m, t: m.decode(t, m.init_decode_state(t.shape[0], 16))[1][0]  # noqa: E731
    else:
        run = lambda m, t: m(t).temporal[0]  # noqa: E731
    logits = nnx.jit(run)(model, jnp.asarray(tokens))
    return np.asarray(logits)[..., text.start:text.stop]


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """family -> ImportResult of `slm convert hf` on the default mesh (fsdp over 8 devices)."""
    root = tmp_path_factory.mktemp("slm")
    return {f: import_hf(d, root / f, progress=False) for f, d in hf_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_hf_logits(family, hf_dirs, converted):
    reference = hf_logits(hf_dirs[family])
    diff = np.abs(slm_text_logits(converted[family].out) - reference).max()
    print(f"{family}: max |slm - hf| logit difference after import {diff:.2e}")
    assert diff < 1e-4
    assert np.abs(slm_text_logits(converted[family].out, cached=True) - reference).max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_to_hf(family, hf_dirs, converted, tmp_path):
    result = export_hf(converted[family].out, tmp_path / "hf")
    assert result.family == family and result.tied == (family == "gemma")
    diff = np.abs(hf_logits(tmp_path / "hf") - hf_logits(hf_dirs[family])).max()
    print(f"{family}: max |round trip - hf| logit difference {diff:.2e}")
    assert diff < 1e-5
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_sharded_load_holds_one_eighth_per_device(converted, hf_dirs, tmp_path):
    stats = converted["llama"].stats
    print(f"llama on 8 devices: {stats.describe()}")
    assert len(stats.device_bytes) == 8
    assert stats.max_device_bytes < stats.total_bytes / 6  # 1/8 plus the replicated norms
    table = converted["llama"].params["embed"]["table"]
    assert stats.largest_read_bytes <= table.nbytes / 8  # no host read of a whole parameter
    # the same checkpoint on one device: new rows do not depend on the mesh
    single = import_hf(hf_dirs["llama"], tmp_path / "one", mesh=one_device_mesh(), progress=False)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(converted["llama"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_speech_vocab_keeps_text_logits(hf_dirs, converted, tmp_path):
    """Gemma (tied head, (1 + scale) norms, scaled embeddings) grown by units and codebooks."""
    config = tmp_path / "speech.yaml"
    config.write_text(SPEECH_YAML)
    grown = import_hf(hf_dirs["gemma"], tmp_path / "grown", config, progress=False)
    vocab = grown.vocab
    assert [r.name for r in vocab.ranges] == ["specials", "text", "units", "ac0", "ac1", "reserved"]
    assert [s.name for s in grown.config.model.streams] == ["text", "units"]
    expanded = slm_text_logits(grown.out)
    diff = np.abs(expanded - hf_logits(hf_dirs["gemma"])).max()
    print(f"gemma + speech vocabulary: max |slm - hf| text logit difference {diff:.2e}")
    assert diff < 1e-4
    np.testing.assert_allclose(expanded, slm_text_logits(converted["gemma"].out), atol=1e-5)
    table = np.asarray(grown.params["embed"]["table"])
    text = vocab.range("text")
    old, new = table[text.start:text.stop], np.delete(table, np.s_[text.start:text.stop], 0)
    spread = np.abs(new - old.mean(0)).max() / old.std(0).mean()
    assert spread < 0.1 and len(np.unique(new, axis=0)) == len(new)  # near the mean, all distinct
    assert export_hf(grown.out, tmp_path / "back").vocab_size == VOCAB


def test_row_stats_match_the_rows():
    rows = np.random.default_rng(1).normal(3.0, 2.0, (5000, 4)).astype(ml_dtypes.bfloat16)
    stats = RowStats.measure(rows)  # 5000 rows: more than one chunk
    np.testing.assert_allclose(stats.mean, np.asarray(rows, np.float64).mean(0), rtol=1e-9)
    cov = np.cov(np.asarray(rows, np.float64).T, bias=True)
    np.testing.assert_allclose(stats.factor @ stats.factor.T, 1e-5 * cov, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("family,change,field", [
    ("llama", {"model_type": "mistral"}, "model_type"),
    ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"hidden_act": "relu"}, "hidden_act"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("gemma", {"hidden_size": None}, "hidden_size"),
])
def test_unsupported_architecture_names_the_field(family, change, field, hf_dirs):
    cfg = {**json.loads((hf_dirs[family] / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=f"`{field}`"):
        hf_model(cfg, "config.json")


def test_cli_refuses_unsupported_config(hf_dirs, tmp_path, capsys):
    model_dir = tmp_path / "scaled"
    shutil.copytree(hf_dirs["llama"], model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", "hf", "--model-dir", str(model_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "`rope_parameters`" in err and "'yarn'" in err


def test_cli_to_hf_and_refuses_to_overwrite(converted, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["convert", "to-hf", "--checkpoint", str(converted["qwen2"].out),
                 "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "qwen2 text model" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert TensorFiles(out).get("model.norm.weight", (64,)).dtype == ml_dtypes.bfloat16
    assert main(["convert", "to-hf", "--checkpoint", str(converted["qwen2"].out),
                 "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_reads_bf16_safetensors_and_weights_only_bin(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(4)}
    (tmp_path / "st").mkdir()
    (tmp_path / "bin").mkdir()
    save_file(tensors, tmp_path / "st" / "model.safetensors")
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    for sub in ("st", "bin"):
        files = TensorFiles(tmp_path / sub)
        a = files.get("a", (3, 5))
        assert a.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), tensors["a"].float().numpy())
        np.testing.assert_array_equal(files.get("b", (4,)), tensors["b"].numpy())


def test_training_starts_from_a_converted_checkpoint(converted, tmp_path):
    """`checkpoint.init_from` fine-tunes the imported weights: step 0 holds them exactly."""
    from slm.config import load_config
    from slm.train.trainer import Trainer

    source = converted["llama"].out
    config = load_config(source / "config.yaml", [
        f"checkpoint.init_from={source}", f"checkpoint.dir={tmp_path / 'finetune'}",
        "train.steps=2", "data.source=synthetic", "data.batch_size=8", "data.seq_len=16"])
    trainer = Trainer(config, progress=False)
    start = trainer.initial_state()
    assert int(start.step) == 0
    imported = jax.tree_util.tree_leaves_with_path(converted["llama"].params)
    restored = dict(jax.tree_util.tree_leaves_with_path(start.params))
    for path, value in imported:
        np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(value))
    result = trainer.run()
    assert int(result.state.step) == 2 and np.isfinite(result.history[-1]["loss"])
