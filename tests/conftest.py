"""Test setup: 8 simulated CPU devices (set before jax is imported) and small shared helpers."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from slm.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_mesh() -> Mesh:
    import numpy as np

    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)


@pytest.fixture
def single_mesh() -> Mesh:
    """Most tests train on one device; sharding tests build their own meshes."""
    return one_device_mesh()


@pytest.fixture
def tiny_config():
    """Factory: a tiny config from configs/tiny with key=value overrides."""

    def make(name: str = "synthetic", *overrides: str):
        return load_config(os.path.join(REPO, "configs", "tiny", f"{name}.yaml"), list(overrides))

    return make


def _tiny_corpus_settings():
    from slm.config import TokenizersConfig
    from slm.data.corpus import CorpusSizes

    sizes = CorpusSizes(train_sentences=24, train_dialogues=8, heldout_sentences=4,
                        heldout_dialogues=4, text_lines=40, text_dialogues=40)
    tokenizers = TokenizersConfig(text_vocab_size=64, num_units=16, num_codebooks=2,
                                  codebook_size=16, train_clips=16)
    return sizes, tokenizers


SIZES, TOKENIZERS = _tiny_corpus_settings()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A tiny synthesized corpus, its tokenizers and its shards: (root, tokenize summary)."""
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    from slm.data.corpus import synthesize_corpus
    from slm.data.prepare import tokenize_corpus, train_corpus_tokenizers

    root = tmp_path_factory.mktemp("prep")
    corpus = synthesize_corpus(root / "corpus", seed=0, sizes=SIZES)
    train_corpus_tokenizers(TOKENIZERS, corpus, root / "tok")
    summary = tokenize_corpus(corpus, root / "tok", root / "shards", workers=1, progress=False,
                              features="states")  # frames cached too, for user_input=features
    return root, summary


# A demo or ablation small enough for a test: a few steps of a very small model on a tiny corpus.
TINY_RUN = ["train.steps=4", "model.d_model=32", "model.num_layers=1", "model.mlp_dim=64",
            "data.batch_size=2", "data.seq_len=128", "checkpoint.every_steps=2",
            "corpus.train_sentences=30", "corpus.train_dialogues=20", "corpus.heldout_sentences=4",
            "corpus.heldout_dialogues=4", "corpus.text_lines=50", "corpus.text_dialogues=50", "tokenizers.num_units=16",
            "tokenizers.codebook_size=32", "tokenizers.unit_encoder_steps=4",
            "tokenizers.unit_vocoder_steps=4"]
SUBPROCESS_ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                      JAX_PLATFORMS="cpu")


@pytest.fixture(scope="session")
def tiny_ablation(tmp_path_factory):
    """`slm ablate` over all five strategies at test size: (output dir, completed process)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("ablation")
    config = root / "ablation.yaml"
    config.write_text(
        f"base: {os.path.join(REPO, 'configs', 'tiny', 'spoken.yaml')}\n"
        "strategies: {chain_of_modality: {}, interleaved: {}, "
        "parallel: {}, coarse_to_fine: {strategy: {options: {user_codes: false}}}, "
        "text_driven: {}}\n"
        "questions: 2\nmax_reply_steps: 24\njudge_steps: 4\n")
    out = root / "out"
    command = [sys.executable, "-m", "slm.cli", "ablate", "--config", str(config), "--out", str(out),
               *TINY_RUN]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done
