"""Every strategy trains on real tokenized speech through the records source."""

import dataclasses

import numpy as np
import pytest

from slm.config import load_config
from slm.data.examples import TASKS
from slm.data.source import make_source
from slm.strategies import NAMES
from slm.train.trainer import train, vocab_from_config
from tests.conftest import REPO


def _config(root, strategy, *overrides):
    return load_config(f"{REPO}/configs/tiny/spoken.yaml", [
        f"strategy.name={strategy}", f"tokenizers.dir={root / 'tok'}", f"data.dir={root / 'shards'}",
        "model.d_model=32", "model.num_layers=1", "model.mlp_dim=64", "data.seq_len=128",
        "data.batch_size=4", *overrides])


@pytest.mark.parametrize("strategy", NAMES)
def test_strategy_trains_on_records_without_invalid_targets(prepared, strategy, single_mesh):
    root, _ = prepared
    result = train(_config(root, strategy, "train.steps=3"), mesh=single_mesh, progress=False)
    assert all(h["invalid_targets"] == 0 and np.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["loss_tokens"] > 0


@pytest.mark.parametrize("strategy, tasks", [
    ("interleaved", list(TASKS)),  # SpiRit-LM's mix: text, speech, interleaved, ASR, TTS
    ("chain_of_modality", ["dialogue", "asr", "tts"]),  # one model, three task tags
])
def test_pretraining_mixture_lays_out_every_task(prepared, strategy, tasks):
    root, _ = prepared
    config = _config(root, strategy, "data.mixture={%s}" % ", ".join(f"{t}: 1.0" for t in tasks))
    vocab = vocab_from_config(config)
    source = make_source(config, vocab)
    for _ in range(5):
        batch = next(source)
        assert batch["tokens"].shape == (4, 1, 128) and batch["weights"].sum() > 0
        vocab.check_ids(batch["tokens"], ["specials", "text", "units"], "mixed batch")


def test_records_source_resumes_from_its_state(prepared):
    root, _ = prepared
    config = _config(root, "parallel")
    vocab = vocab_from_config(config)
    source = make_source(config, vocab)
    next(source)
    state = source.get_state()
    want = next(source)
    again = make_source(config, vocab)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], want["tokens"])


def test_records_source_needs_a_directory(prepared):
    from slm.errors import ConfigError

    root, _ = prepared
    config = _config(root, "parallel")
    config.data = dataclasses.replace(config.data, dir="")
    with pytest.raises(ConfigError, match="data.dir"):
        make_source(config, vocab_from_config(config))
