"""Every attention kernel against a plain softmax, how `auto` picks one, and the custom-gradient
matmuls against plain JAX references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from slm.config import MeshConfig
from slm.errors import ConfigError
from slm.model import attention
from slm.model.attention import causal_attention, compilable, resolve
from slm.model.decoder import StackSpec
from slm.model.matmul import dense, dense_rows, dense_side_by_side
from slm.parallel.mesh import make_mesh


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


def reference(q_btnh, k_btkh, v_btkh, segments_bt=None):
    """The plain masked softmax, with key/value heads repeated for their query groups."""
    b, t, n, h = q_btnh.shape
    g = n // k_btkh.shape[2]
    k_btnh, v_btnh = jnp.repeat(k_btkh, g, axis=2), jnp.repeat(v_btkh, g, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_btnh) / np.sqrt(h)
    visible = np.tril(np.ones((t, t), bool))[None, None]
    if segments_bt is not None:
        visible = visible & (segments_bt[:, None, :, None] == segments_bt[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v_btnh)


def _loss(fn, segments):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, segments)))


def _assert_matches_reference(fn, t, heads, kv_heads, segments):
    q, k, v = _qkv(t, heads, kv_heads)
    np.testing.assert_allclose(fn(q, k, v, segments), reference(q, k, v, segments),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(_loss(fn, segments), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(_loss(reference, segments), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, expected):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t,heads,kv_heads,packed", [(1, 4, 4, False), (21, 4, 4, False),
                                                     (21, 4, 2, True)])  # 21: uneven blocks
@pytest.mark.parametrize("kernel", ["blocked", "dot_product"])
def test_xla_kernels_match_the_plain_softmax(kernel, t, heads, kv_heads, packed):
    segments = _packed_segments(t) if packed else None
    _assert_matches_reference(lambda q, k, v, s: causal_attention(q, k, v, s, kernel),
                              t, heads, kv_heads, segments)


@pytest.mark.parametrize("t,packed", [(21, True), (130, False)])  # padded to 128 and to 256
def test_splash_kernel_matches_the_plain_softmax_in_interpret_mode(t, packed):
    segments = _packed_segments(t) if packed else None
    _assert_matches_reference(lambda q, k, v, s: causal_attention(q, k, v, s, "splash"),
                              t, 4, 2, segments)


def test_splash_runs_once_per_shard_under_a_mesh():
    """Rows split over `data`, heads over `tensor`: each shard's kernel sees whole query groups."""
    mesh = make_mesh(MeshConfig(ici={"data": 2, "fsdp": 1, "tensor": 2}), jax.devices()[:4])
    q, k, v = _qkv(40, 4, 2, seed=1)
    segments = _packed_segments(40)

    @functools.partial(jax.jit, in_shardings=NamedSharding(mesh, PartitionSpec()))
    def sharded(q, k, v, segments):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step
            return causal_attention(q, k, v, segments, "splash")

    text = sharded.lower(q, k, v, segments).as_text()
    assert "shard_map" in text or "manual" in text.lower()
    np.testing.assert_allclose(sharded(q, k, v, segments), reference(q, k, v, segments),
                               rtol=1e-5, atol=1e-5)


def test_cudnn_kernel_is_called_with_causal_and_segment_masks(monkeypatch):
    """No GPU here: the arguments the cuDNN path passes, run through XLA's implementation,
    give the plain softmax (cuDNN itself is jax's to test)."""
    calls = []

    def xla_instead(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs["is_causal"]))
        return real(*args, implementation=None, **kwargs)

    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    for segments in (None, _packed_segments(21)):
        q, k, v = _qkv(21, 4, 2)
        np.testing.assert_allclose(attention.library_attention(q, k, v, segments, "cudnn"),
                                   reference(q, k, v, segments), rtol=1e-5, atol=1e-5)
    assert calls == [("cudnn", True)] * 2


def test_auto_picks_the_kernel_of_each_backend():
    assert resolve("auto", "cpu", jnp.float32, 2048) == "blocked"
    assert resolve("auto", "cpu", jnp.bfloat16, 8) == "blocked"
    assert resolve("auto", "tpu", jnp.bfloat16, 2048) == "splash"
    assert resolve("auto", "gpu", jnp.bfloat16, 2048) == "cudnn"
    assert resolve("auto", "gpu", jnp.float32, 2048) == "dot_product"  # cuDNN has no fp32 kernel
    assert resolve("auto", "tpu", jnp.bfloat16, 8) == "dot_product"  # shorter than one tile
    assert resolve("blocked", "tpu", jnp.bfloat16, 2048) == "blocked"  # a named kernel stays
    # what CPU devices compile when they stand in for an accelerator (slm plan)
    assert compilable("splash", "cpu", jnp.bfloat16, 2048) == "auto"
    assert compilable("cudnn", "cpu", jnp.bfloat16, 2048) == "auto"
    assert compilable("splash", "tpu", jnp.bfloat16, 2048) == "splash"
    assert compilable("dot_product", "cpu", jnp.bfloat16, 2048) == "dot_product"
    # on this CPU backend, auto is the blocked kernel exactly
    q, k, v = _qkv(21, 4, 2)
    segments = _packed_segments(21)
    np.testing.assert_array_equal(causal_attention(q, k, v, segments),
                                  attention.blocked_attention(q, k, v, segments))


def test_cudnn_off_a_gpu_or_in_float32_is_a_config_error(monkeypatch):
    q, k, v = _qkv(8, 2, 2)
    with pytest.raises(ConfigError, match="model.attention=cudnn needs an NVIDIA GPU"):
        causal_attention(q, k, v, None, "cudnn")
    monkeypatch.setattr(attention, "compiled_platform", lambda: "gpu")
    with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
        causal_attention(q, k, v, None, "cudnn")


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
