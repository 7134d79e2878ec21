"""Sharded training on 8 simulated CPU devices matches one device, and parameters really shard."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm.config import MeshConfig
from slm.data.synthetic import SyntheticTokens
from slm.errors import ConfigError, ShardingError
from slm.parallel import rules
from slm.parallel.mesh import fill_axis_sizes, make_mesh
from slm.parallel.rules import batch_sharding
from slm.train.optim import make_optimizer
from slm.train.state import init_params, plan_state
from slm.train.trainer import vocab_from_config

MESHES = [
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 1, "fsdp": 4, "tensor": 2},
    {"data": 2, "fsdp": 2, "tensor": 2},
]


@functools.lru_cache(maxsize=None)
def _loss_and_grads(mesh_items: tuple):
    """Loss and gradients of one batch with parameters laid out on the given mesh."""
    from slm.config import load_config
    from tests.conftest import REPO

    mesh_sizes = dict(mesh_items)
    config = load_config(f"{REPO}/configs/tiny/multistream.yaml")
    config.mesh = MeshConfig(ici=mesh_sizes)
    vocab = vocab_from_config(config)
    devices = jax.devices()[: math.prod(mesh_sizes.values())]
    mesh = make_mesh(config.mesh, devices)
    plan = plan_state(config, vocab, mesh, make_optimizer(config.optim, 10))
    params = init_params(config, vocab, plan, jax.random.key(0))
    batch = next(SyntheticTokens(config, vocab))
    batch = {k: jax.device_put(v, batch_sharding(mesh, 3)) for k, v in batch.items()}

    def mean_loss(p, tokens, weights):
        total, weight, _ = plan.model(p).loss(tokens, weights)
        return total / weight

    fn = jax.jit(jax.value_and_grad(mean_loss), in_shardings=(plan.param_shardings, None, None))
    loss, grads = fn(params, batch["tokens"], batch["weights"])
    return float(loss), jax.device_get(grads), plan, params


def _on(mesh_sizes: dict):
    return _loss_and_grads(tuple(mesh_sizes.items()))


@pytest.mark.parametrize("mesh_sizes", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_sharded_loss_and_grads_match_one_device(mesh_sizes):
    loss_1, grads_1, _, _ = _on({"data": 1, "fsdp": 1, "tensor": 1})
    loss_n, grads_n, plan, _ = _on(mesh_sizes)
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_n, grads_1)
    assert plan.replicated_fraction <= 0.02


def test_fsdp8_splits_parameter_bytes_evenly():
    _, _, _, params = _on({"data": 1, "fsdp": 8, "tensor": 1})
    leaves = jax.tree.leaves(params)
    total = sum(x.nbytes for x in leaves)
    per_device = {}
    for x in leaves:
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert len(per_device) == 8
    for nbytes in per_device.values():
        assert abs(nbytes - total / 8) <= 0.05 * total / 8, (nbytes, total / 8)


def test_guard_fails_when_parameters_stay_replicated(tiny_config, monkeypatch):
    config = tiny_config("multistream", "mesh.ici={data: 1, fsdp: 8, tensor: 1}")
    mesh = make_mesh(config.mesh)
    monkeypatch.setitem(rules.RULES, "embed", ())
    monkeypatch.setitem(rules.RULES, "vocab", ())
    with pytest.raises(ShardingError, match="replicated"):
        plan_state(config, vocab_from_config(config), mesh, make_optimizer(config.optim, 10))


def test_logical_to_spec_skips_axes_that_do_not_divide():
    mesh = make_mesh(MeshConfig(ici={"data": 1, "fsdp": 4, "tensor": 2}), jax.devices())
    assert rules.logical_to_spec(("embed", "mlp"), (64, 6), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert rules.logical_to_spec(("embed", "mlp"), (6, 5), mesh) == jax.sharding.PartitionSpec(None, None)
    # one mesh axis never shards two dimensions of the same array
    assert rules.logical_to_spec(("embed", "embed"), (8, 8), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    with pytest.raises(ShardingError, match="no rule"):
        rules.logical_to_spec(("nonsense",), (8,), mesh)


def test_mesh_sizes_fill_and_validate():
    assert fill_axis_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 8, "mesh.ici") == (2, 2, 2)
    with pytest.raises(ConfigError, match="mesh.ici.pipeline"):
        fill_axis_sizes({"pipeline": 2}, 8, "mesh.ici")
    with pytest.raises(ConfigError, match="use 4 devices"):
        fill_axis_sizes({"data": 2, "fsdp": 2, "tensor": 1}, 8, "mesh.ici")
    with pytest.raises(ConfigError, match="at most one"):
        fill_axis_sizes({"data": -1, "fsdp": -1}, 8, "mesh.ici")


def test_jitted_train_step_keeps_parameter_shardings(tiny_config):
    from slm.train.trainer import train

    config = tiny_config("multistream", "train.steps=2", "mesh.ici={data: 2, fsdp: 2, tensor: 2}")
    result = train(config, progress=False)
    for leaf, sharding in zip(jax.tree.leaves(result.state.params),
                              jax.tree.leaves(result.plan.param_shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert jnp.isfinite(result.history[-1]["loss"])


def test_mesh_of_takes_the_devices_its_axes_use():
    from slm.parallel.mesh import mesh_of

    assert dict(mesh_of("tensor=2").shape) == {"data": 1, "fsdp": 1, "tensor": 2}
    assert dict(mesh_of("data=2, tensor=-1").shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ConfigError, match="needs 16 devices"):
        mesh_of("data=2,tensor=8")
    with pytest.raises(ConfigError, match="axis=size"):
        mesh_of("tensor")
