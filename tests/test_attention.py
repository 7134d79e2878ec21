"""The blocked causal attention and the custom-gradient matmuls against plain JAX references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm.errors import ConfigError
from slm.model.attention import causal_attention
from slm.model.decoder import StackSpec
from slm.model.matmul import dense, dense_rows, dense_side_by_side


def _qkv(t: int, heads: int, kv_heads: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, t, heads, 8))
    k = jax.random.normal(keys[1], (2, t, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, t, kv_heads, 8))
    return q, k, v


def _packed_segments(t: int) -> jax.Array:
    """Row 0: one example; row 1: three examples of uneven lengths."""
    second = np.zeros(t, np.int32)
    second[t // 3:] = 1
    second[t // 3 + t // 4 + 1:] = 2
    return jnp.asarray(np.stack([np.zeros(t, np.int32), second]))


@pytest.mark.parametrize("t", [1, 21])  # 21: four uneven blocks
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_attention_matches_dot_product_attention(t, heads, kv_heads, packed):
    q, k, v = _qkv(t, heads, kv_heads)
    segments = _packed_segments(t) if packed else None

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(causal_attention(q, k, v, segments, impl)))

    np.testing.assert_allclose(causal_attention(q, k, v, segments, "blocked"),
                               causal_attention(q, k, v, segments, "dot_product"),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss("blocked"), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss("dot_product"), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_blocked_attention_never_sees_the_future_or_other_examples():
    t = 12
    q, k, v = _qkv(t, 2, 2)
    segments = _packed_segments(t)
    out = causal_attention(q, k, v, segments)
    later = v.at[:, 8:].set(100.0)  # changes only positions 8.. (and what attends to them)
    out_later = causal_attention(q, k, later, segments)
    np.testing.assert_array_equal(out[:, :8], out_later[:, :8])
    # row 1's second example starts at t // 3 = 4: its outputs ignore the first example
    first = v.at[1, :4].set(-100.0)
    np.testing.assert_array_equal(causal_attention(q, k, first, segments)[1, 4:], out[1, 4:])


def test_unknown_attention_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention='flash'"):
        StackSpec(16, 1, 2, 2, 8, 32, attention="flash")


def test_custom_gradient_matmuls_match_autodiff():
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (3, 5, 16))
    w1, w2 = jax.random.normal(keys[1], (16, 4, 6)), jax.random.normal(keys[2], (16, 8))
    table = jax.random.normal(keys[3], (24, 16))

    def ours(x, w1, w2, table):
        y1, y2 = dense(x, w1, w2)
        return jnp.sum(jnp.sin(y1)) + jnp.sum(y2**2) + jnp.sum(jnp.cos(dense_rows(x, table)))

    def plain(x, w1, w2, table):
        return (jnp.sum(jnp.sin(jnp.einsum("btk,knh->btnh", x, w1))) + jnp.sum((x @ w2) ** 2)
                + jnp.sum(jnp.cos(x @ table.T)))

    np.testing.assert_allclose(ours(x, w1, w2, table), plain(x, w1, w2, table), rtol=1e-5)
    for g, r in zip(jax.grad(ours, argnums=(0, 1, 2, 3))(x, w1, w2, table),
                    jax.grad(plain, argnums=(0, 1, 2, 3))(x, w1, w2, table)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_side_by_side_products_equal_separate_ones():
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (3, 1, 16))
    ws = (jax.random.normal(keys[1], (16, 4, 2)), jax.random.normal(keys[2], (16, 2, 2)),
          jax.random.normal(keys[3], (16, 5)))
    for ours, w in zip(dense_side_by_side(x, *ws), ws):
        np.testing.assert_allclose(ours, jnp.tensordot(x, w, axes=1), rtol=1e-5, atol=1e-5)
