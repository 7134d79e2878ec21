"""Held-out loss while training (slm.train.evaluate) and profiler traces of chosen steps."""

from pathlib import Path

import jax
import numpy as np
import pytest

from slm.config import load_config
from slm.errors import ConfigError
from slm.train.evaluate import heldout_losses, make_eval_step
from slm.train.trainer import Trainer, train
from tests.conftest import REPO


def tiny(*overrides: str):
    return load_config(f"{REPO}/configs/tiny/synthetic.yaml", list(overrides))


def test_eval_loss_of_a_training_batch_is_its_training_loss(single_mesh):
    trainer = Trainer(tiny(), mesh=single_mesh, progress=False)
    state = trainer.initial_state()
    batch = trainer._device_batch(next(trainer.source))
    held = heldout_losses(make_eval_step(trainer.plan), state.params, {"train": [batch]})
    _, metrics = trainer.step_fn(state, batch)  # the loss of the parameters before the update
    assert held["eval/train/loss"] == pytest.approx(float(metrics["loss"]), rel=1e-5)
    assert held["eval/train/loss/text"] == pytest.approx(float(metrics["loss/text"]), rel=1e-5)


def test_evaluation_changes_nothing_a_resumed_run_reads(tmp_path, single_mesh):
    import shutil

    common = ["train.steps=6", "checkpoint.every_steps=3", "eval.every_steps=2"]
    straight = train(tiny(*common, f"checkpoint.dir={tmp_path / 'a'}"), mesh=single_mesh,
                     progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "6")  # as if killed after step 3's checkpoint
    resumed = train(tiny(*common, f"checkpoint.dir={tmp_path / 'b'}"), mesh=single_mesh,
                    progress=False)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    evaluated = [h for h in straight.history if "eval/synthetic/loss" in h]
    assert [h["step"] for h in evaluated] == [2, 4, 6]
    assert evaluated[-1]["eval/synthetic/loss"] == resumed.history[-1]["eval/synthetic/loss"]
    untouched = train(tiny("train.steps=6", f"checkpoint.dir={tmp_path / 'c'}"),
                      mesh=single_mesh, progress=False)  # evaluation moves no training batch
    assert [h["loss"] for h in untouched.history] == [h["loss"] for h in straight.history]


def test_every_heard_task_gets_its_own_heldout_loss(prepared, single_mesh):
    root, _ = prepared
    config = load_config(f"{REPO}/configs/tiny/spoken.yaml", [
        f"tokenizers.dir={root / 'tok'}", f"data.dir={root / 'shards'}", "model.d_model=32",
        "model.num_layers=1", "model.mlp_dim=64", "data.seq_len=128", "data.batch_size=4",
        "train.steps=2", "eval.every_steps=2", "eval.batches=1",
        "data.mixture={dialogue: 1, asr: 1, text_dialogue: 1}"])
    last = train(config, mesh=single_mesh, progress=False).history[-1]
    assert {"eval/dialogue/loss", "eval/asr/loss"} <= set(last)
    assert not any(k.startswith("eval/text_dialogue") for k in last)  # no held-out split
    streams = [k for k in last if k.startswith("eval/dialogue/loss/")]
    assert streams and all(np.isfinite(last[k]) and last[k] > 0 for k in streams)


def test_a_profiled_run_writes_a_trace(tmp_path, single_mesh):
    train(tiny("train.steps=3", "train.profile_steps=[2, 3]", f"train.tensorboard_dir={tmp_path}"),
          mesh=single_mesh, progress=False)
    assert list(Path(tmp_path).rglob("*.xplane.pb"))


@pytest.mark.parametrize("steps, where, match", [
    ("[3]", "train.tensorboard_dir=/tmp/x", "give \\[first, last\\]"),
    ("[2, 3]", "train.tensorboard_dir=", "set train.tensorboard_dir or checkpoint.dir"),
])
def test_bad_profile_steps_are_named(steps, where, match, single_mesh):
    with pytest.raises(ConfigError, match=match):
        train(tiny("train.steps=3", f"train.profile_steps={steps}", where), mesh=single_mesh,
              progress=False)
