"""LoRA (slm.model.lora): fresh adapters change nothing, merging changes nothing, dropout acts
in training only, bad targets and ranks are named, and adapters shard by their logical names."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slm.config import LoraConfig, MeshConfig
from slm.errors import ConfigError
from slm.model import SpeechLM, lora
from slm.parallel.mesh import make_mesh
from slm.train.optim import make_optimizer
from slm.train.state import plan_state
from slm.train.trainable import is_adapter, is_base, paths, split_tree
from slm.train.trainer import vocab_from_config
from tests.test_model import VOCAB, build, decode_in_chunks, depth_decode, make_cfg, random_tokens

ALL_TARGETS = LoraConfig(rank=4, alpha=8.0, targets=list(lora.TARGETS))


def adapted_cfg(**changes):
    """The depth model of test_model with adapters on every projection lora offers."""
    return make_cfg(depth=True, lora=dataclasses.replace(ALL_TARGETS, **changes))


BASE_CFG = make_cfg(depth=True)


def pure(model: SpeechLM) -> dict:
    return nnx.to_pure_dict(nnx.state(model))


def as_model(cfg, params: dict) -> SpeechLM:
    """`params` in a model of `cfg` (built abstractly: only the graph is used)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(cfg)))
    return nnx.merge(graphdef, params)


def with_random_b(params: dict, seed: int = 1) -> dict:
    """Adapters as training leaves them: `b` no longer zero."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
        if jax.tree_util.keystr(path).endswith("['b']") else x, params)


@nnx.jit
def forward(model: SpeechLM, tokens):
    out = model(tokens)
    return out.temporal, out.depth, out.hidden


@nnx.jit
def loss(model: SpeechLM, tokens, weights, key):
    return model.loss(tokens, weights, dropout_key=key)[0]


def max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fresh_adapters_leave_the_model_unchanged():
    model = build(adapted_cfg())
    params = pure(model)
    adapters, base = split_tree(params, is_adapter)
    assert {p[-1] for p in paths(adapters)} == {"a", "b"}
    assert {p[-2] for p in paths(adapters)} == {t.removeprefix("depth.") for t in lora.TARGETS}
    assert not any(np.any(b) for p, b in zip(paths(adapters), jax.tree.leaves(adapters))
                   if p[-1] == "b")
    tokens = random_tokens(model)
    assert max_diff(forward(model, tokens), forward(as_model(BASE_CFG, base), tokens)) <= 1e-6


def test_merged_adapters_compute_what_unmerged_ones_do():
    cfg = adapted_cfg()
    params = with_random_b(pure(build(cfg)))
    adapted = as_model(cfg, params)
    merged = as_model(BASE_CFG, lora.merge(params, cfg.lora))
    base = as_model(BASE_CFG, split_tree(params, is_base)[0])
    assert not any(is_adapter(p) for p in paths(pure(merged)))
    tokens = random_tokens(adapted, seed=3)
    got, want = forward(adapted, tokens), forward(merged, tokens)
    assert max_diff(got, want) <= 1e-5
    assert max_diff(forward(base, tokens), want) > 1e-2, "the adapters must matter"
    # cached decoding and the depth decoder's steps apply the adapters too
    _, logits = decode_in_chunks(adapted, tokens, [3, 1, 1, 2])
    assert max_diff(logits, want[0]) <= 1e-5
    h_nd = got[2][:, :-1].reshape(-1, got[2].shape[-1])
    prev_nq = adapted._depth_inputs(tokens[:, :, 1:]).reshape(h_nd.shape[0], -1)
    stepped = depth_decode(adapted, h_nd, prev_nq)
    assert max_diff(stepped, want[1].reshape(stepped.shape)) <= 1e-5


def test_dropout_acts_on_the_adapters_in_training_only():
    cfg = adapted_cfg(dropout=0.5)
    params = with_random_b(pure(build(cfg)))
    adapted, merged = as_model(cfg, params), as_model(BASE_CFG, lora.merge(params, cfg.lora))
    tokens = random_tokens(adapted, seed=4)
    weights = jnp.ones(tokens.shape, jnp.float32)
    plain = float(loss(adapted, tokens, weights, None))
    np.testing.assert_allclose(plain, float(loss(merged, tokens, weights, None)), rtol=1e-5)
    one, two = jax.random.key(1), jax.random.key(2)
    dropped = float(loss(adapted, tokens, weights, one))
    assert dropped == float(loss(adapted, tokens, weights, one)), "a key gives one mask"
    assert abs(dropped - plain) > 1e-4 and dropped != float(loss(adapted, tokens, weights, two))
    # the base path has no dropout: without adapters a key changes nothing
    base = as_model(BASE_CFG, split_tree(params, is_base)[0])
    assert float(loss(base, tokens, weights, one)) == float(loss(base, tokens, weights, None))


@pytest.mark.parametrize("cfg, named", [
    (make_cfg(lora=LoraConfig(rank=4, targets=["qkv"])), r"model.lora.targets\[0\]='qkv'"),
    (make_cfg(lora=LoraConfig(rank=4, targets=["q", "depth.q"])),
     r"targets\[1\]='depth.q': this model has no depth decoder"),
    (make_cfg(tie_embeddings=True, lora=LoraConfig(rank=4, targets=["heads"])),
     "model.tie_embeddings=false"),
    # k projects d_model 32 onto 2 kv heads of 8: at most rank 16
    (make_cfg(lora=LoraConfig(rank=17, targets=["q", "k"])),
     r"model.lora.rank=17 exceeds projection 'k' \(32 -> 16\).*model.lora.rank <= 16"),
    (make_cfg(depth=True, lora=LoraConfig(rank=9, targets=["depth.k"])),
     r"exceeds projection 'depth.k' \(16 -> 8\)"),
    (make_cfg(lora=LoraConfig(rank=-1)), "model.lora.rank=-1"),
    (make_cfg(lora=LoraConfig(rank=4, dropout=1.0)), "model.lora.dropout"),
], ids=["unknown", "no-depth", "tied-heads", "rank-k", "rank-depth", "negative", "dropout"])
def test_bad_adapters_are_config_errors_naming_the_field(cfg, named):
    with pytest.raises(ConfigError, match=named):
        nnx.eval_shape(lambda: SpeechLM(cfg, VOCAB, nnx.Rngs(0)))


def test_adapters_carry_logical_names_and_shard(tiny_config):
    config = tiny_config("multistream", "model.lora.rank=4", "model.lora.targets=[" +
                         ", ".join(lora.TARGETS) + "]")
    mesh = make_mesh(MeshConfig(ici={"data": 1, "fsdp": 4, "tensor": 2}), jax.devices())
    plan = plan_state(config, vocab_from_config(config), mesh, make_optimizer(config.optim, 10))
    adapters, _ = split_tree(plan.param_shardings, is_adapter)
    assert len(paths(adapters)) == 2 * len(lora.TARGETS)
    unsplit = [p for p, s in zip(paths(adapters), jax.tree.leaves(adapters))
               if all(axis is None for axis in s.spec)]
    assert not unsplit, f"adapters left whole on every device: {unsplit}"
