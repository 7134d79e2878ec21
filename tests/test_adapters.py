"""Adapters-only checkpoints (slm.train.adapters): a LoRA run over a base saves its adapters
alone, loads back over that base to the run's own model, exports merged, and refuses a base
whose parameters differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from slm.convert.hf_export import export_hf
from slm.errors import AdapterBaseError, CheckpointError
from slm.train.adapters import load_adapted, save_adapters
from slm.train.checkpoint import load_model
from slm.train.trainable import is_base, split_tree
from slm.train.trainer import train
from tests.conftest import one_device_mesh
from tests.test_train import assert_trees_equal, tiny

LORA_RUN = ("train.steps=3", "model.lora.rank=4", "train.trainable=[lora]")


def disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base checkpoint, a LoRA run started from it, and its adapters saved alone."""
    root = tmp_path_factory.mktemp("adapters")
    base, run = root / "base", root / "run"
    train(tiny("synthetic", "train.steps=2", f"checkpoint.dir={base}"), mesh=one_device_mesh(),
          progress=False)
    result = train(tiny("synthetic", *LORA_RUN, f"checkpoint.init_from={base}",
                        f"checkpoint.dir={run}"), mesh=one_device_mesh(), progress=False)
    return root, base, run, result, save_adapters(run, root / "adapter")


def params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model))


def test_a_lora_run_keeps_its_base_frozen(runs):
    _, base, _, result, _ = runs
    base_model, _, _ = load_model(base)
    assert_trees_equal(split_tree(result.state.params, is_base)[0], params(base_model), "base")


def test_adapters_alone_load_back_to_the_run_merged(runs):
    _, base, run, _, adapter = runs
    assert disk_bytes(adapter) < disk_bytes(base) / 5, "adapters alone, not the base again"
    from_adapter, config, _ = load_model(adapter)
    from_run, _, _ = load_model(run)
    assert config.model.lora.rank == 0, "merged: the loaded model has no adapters left"
    assert_trees_equal(params(from_adapter), params(from_run), "merged parameters")
    base_model, _, _ = load_model(base)
    moved = params(from_adapter)["decoder"]["layers"]["attn"]["wq"]
    assert not np.array_equal(moved, params(base_model)["decoder"]["layers"]["attn"]["wq"])


def test_export_to_hf_folds_the_adapters_in(runs, tmp_path):
    _, base, run, _, adapter = runs
    exported = {name: (export_hf(source, tmp_path / name).out / "model.safetensors").read_bytes()
                for name, source in (("adapter", adapter), ("run", run), ("base", base))}
    assert exported["adapter"] == exported["run"] != exported["base"]


def test_an_adapter_refuses_another_base(runs, tmp_path):
    root, _, run, _, adapter = runs
    other = tmp_path / "other"
    train(tiny("synthetic", "train.steps=2", "seed=1", f"checkpoint.dir={other}"),
          mesh=one_device_mesh(), progress=False)
    with pytest.raises(AdapterBaseError, match="checksum") as raised:
        load_adapted(adapter, base=other)
    assert str(adapter) in str(raised.value) and str(other) in str(raised.value)
    with pytest.raises(CheckpointError, match="checkpoint.init_from"):
        save_adapters(root / "base", tmp_path / "nothing")  # not a run over a base
