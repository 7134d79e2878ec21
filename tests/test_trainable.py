"""train.trainable (slm.train.trainable): parts and patterns, frozen parameters get neither
gradients nor optimizer state, `[all]` keeps the train state's layout, and a partial selection
trains sharded."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from slm.errors import ConfigError
from slm.model import lora
from slm.train.optim import make_optimizer
from slm.train.plan import _lower
from slm.train.state import abstract_model, plan_state
from slm.train.trainable import is_adapter, paths, select
from slm.train.trainer import Trainer, train, vocab_from_config
from tests.test_train import leaves, tiny

RANK = "model.lora.rank=4"
ADAPTERS = (RANK, "model.lora.targets=[" + ", ".join(lora.TARGETS) + "]")  # every projection


def key_of(path: tuple[str, ...]) -> str:
    """A parameter path as `leaves` (test_train) names it."""
    return "".join(f"['{k}']" for k in path)


def param_shapes(config) -> dict:
    return abstract_model(config, vocab_from_config(config))[1]


def test_parts_and_patterns_select_parameters():
    shapes = param_shapes(tiny("multistream", *ADAPTERS))
    every = paths(shapes)
    assert select(["all"], shapes).everything
    adapters = select(["lora"], shapes)
    assert not adapters.everything and adapters.chosen == {p for p in every if is_adapter(p)}
    attention = select([r"decoder/layers/attn/w[qk]"], shapes)
    assert attention.chosen == {("decoder", "layers", "attn", "wq"),
                                ("decoder", "layers", "attn", "wk")}
    heads = select(["heads"], shapes).chosen
    assert {("heads", "w"), ("depth", "head")} <= heads and not any(map(is_adapter, heads))
    both = select(["heads", "lora"], shapes)
    assert both.chosen == heads | adapters.chosen
    trained, frozen = both.split(shapes)
    assert set(paths(trained)) == both.chosen and set(paths(frozen)) == set(every) - both.chosen
    assert both.merge(trained, frozen) == shapes


@pytest.mark.parametrize("entries, named", [
    (["nonsense"], r"train.trainable\[0\]='nonsense' selects no parameter.*decoder/"),
    (["all", "decoder/layer/.*"], r"train.trainable\[1\]='decoder/layer/.\*'"),
    (["lora"], r"'lora' selects no parameter.*model.lora.rank > 0"),
    (["projector"], r"'projector' selects no parameter.*strategy.user_input=features"),
    (["w[q"], r"train.trainable\[0\]='w\[q' is neither a part .* nor a valid regex"),
    ([], "train.trainable is empty"),
], ids=["unknown", "pattern", "no-lora", "no-projector", "bad-regex", "empty"])
def test_entries_that_select_nothing_are_named(entries, named):
    with pytest.raises(ConfigError, match=named):
        select(entries, param_shapes(tiny("synthetic")))


def test_all_keeps_the_train_state_layout_of_checkpoints(single_mesh):
    """`[all]` must restore checkpoints written before train.trainable existed: the optimizer
    state is built over the whole parameter dict, as it was."""
    config = tiny("synthetic")
    optimizer = make_optimizer(config.optim, config.train.steps)
    plan = plan_state(config, vocab_from_config(config), single_mesh, optimizer)
    assert plan.trainable.everything
    assert (jax.tree.structure(plan.state_shapes.opt_state)
            == jax.tree.structure(jax.eval_shape(optimizer.init, plan.param_shapes)))


def test_frozen_parameters_get_no_gradients_state_or_updates(single_mesh):
    config = tiny("synthetic", "train.steps=3", RANK, "train.trainable=[lora, norms]")
    initial = leaves(Trainer(config, mesh=single_mesh, progress=False).initial_state().params)
    result = train(config, mesh=single_mesh, progress=False)
    trained = {key_of(p) for p in result.plan.trainable.chosen}
    assert all(is_adapter(p) or p[-2].endswith("norm") for p in result.plan.trainable.chosen)
    final = leaves(result.state.params)
    assert trained < final.keys()
    for name, value in final.items():
        assert np.array_equal(value, initial[name]) == (name not in trained), name
    # optimizer state: Adam's two moments of the trained parameters, nothing of the frozen ones
    moments = sum(x.nbytes for x in jax.tree.leaves(result.state.opt_state) if x.ndim)
    assert moments == 2 * sum(final[name].nbytes for name in trained)


def test_no_gradient_work_is_spent_on_frozen_parameters(single_mesh):
    """The compiled step of a LoRA run does far fewer FLOPs than full fine-tuning: the weight
    gradients of the frozen matrices (a third of a step's matmuls) are not computed."""
    flops = {}
    for entries in ("[all]", "[lora]"):
        config = tiny("synthetic", RANK, "model.lora.targets=[q, k, v, o, gate, up, down]",
                      "model.scan_layers=false",  # XLA counts a loop body once
                      f"train.trainable={entries}")
        _, _, lowered = _lower(config, vocab_from_config(config), single_mesh, 1)
        flops[entries] = lowered.cost_analysis()["flops"]
    assert flops["[lora]"] < 0.8 * flops["[all]"], flops


def test_partial_selection_trains_sharded(single_mesh):
    overrides = ("train.steps=3", *ADAPTERS, "train.trainable=[lora, heads]")  # step 1: lr 0
    sharded = train(tiny("multistream", *overrides, "mesh.ici={data: 2, fsdp: 2, tensor: 2}"),
                    progress=False)
    for leaf, sharding in zip(jax.tree.leaves(sharded.state.params),
                              jax.tree.leaves(sharded.plan.param_shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    single = train(tiny("multistream", *overrides), mesh=single_mesh, progress=False)
    np.testing.assert_allclose([h["loss"] for h in sharded.history],
                               [h["loss"] for h in single.history], rtol=1e-5)
