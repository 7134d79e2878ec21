"""Causal self-attention over whole sequences (training, scoring), one kernel per backend.

`model.attention` names the kernel; `auto` (the default) picks it from the platform the
computation is compiled for (the mesh's devices, so `slm plan` for a TPU topology counts too):

  cpu  `blocked`: queries in row blocks, each scoring only the keys up to its own end. A
       masked `[T, T]` score matrix spends half its products, exponentials and gradient on
       entries the causal mask then discards; four blocks skip 3/8 of that work at a small
       per-block overhead. On the 30M benchmark model this made a train step's attention
       about twice as fast as `jax.nn.dot_product_attention` on XLA:CPU.
  gpu  `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
       kernel, when the activations are bfloat16 or float16 (cuDNN has no float32 kernel);
       `dot_product` (XLA's) otherwise.
  tpu  `splash`: the Pallas splash-attention kernel, which skips the blocks the causal mask
       empties and takes packed rows as segment ids.

Sequences shorter than one kernel tile (`KERNEL_BLOCK`; the depth decoder's few codebook
steps) use `dot_product` on accelerators: a flash tile would be mostly padding.

Packed rows: `blocked`, `dot_product` and `splash` take the segment ids themselves. cuDNN's
packed layout (per-segment offsets) is not part of `jax.nn.dot_product_attention` in this JAX
(only in its private cuDNN module), and its `query_seq_lengths` describe one padded sequence
per row, not several; so packed rows reach cuDNN as a boolean same-segment mask, which it
applies as an additive bias beside its causal mask.

Scores and softmax run in float32 in every kernel. Tests compare each kernel that runs on a
CPU with a plain softmax, `splash` in Pallas interpret mode (which is also how it runs off
TPU); for cuDNN, the arguments it is given, run through XLA's implementation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from slm.errors import ConfigError

IMPLEMENTATIONS = ("auto", "blocked", "dot_product", "cudnn", "splash")
QUERY_BLOCKS = 4
KERNEL_BLOCK = 128  # splash's smallest tile (one lane width), and cuDNN's
SPLASH_BLOCKS = (512, 256, KERNEL_BLOCK)  # the largest that divides the padded length is used
GPU_PLATFORMS = ("gpu", "cuda")
HALF_DTYPES = (jnp.bfloat16, jnp.float16)
NATIVE = {"splash": ("tpu",), "cudnn": GPU_PLATFORMS}  # kernels that compile on some platforms only


def resolve(implementation: str, platform: str, dtype, length: int) -> str:
    """The kernel `implementation` stands for on `platform` with activations of `dtype` and
    sequences of `length`: itself, unless it is `auto`."""
    if implementation != "auto":
        return implementation
    if platform == "cpu":
        return "blocked"
    if length < KERNEL_BLOCK:
        return "dot_product"
    if platform == "tpu":
        return "splash"
    if platform in GPU_PLATFORMS and jnp.dtype(dtype) in HALF_DTYPES:
        return "cudnn"
    return "dot_product"


def compilable(implementation: str, platform: str, dtype, length: int) -> str:
    """`implementation` where its kernel compiles on `platform`, else `auto` (which always
    does): what `slm plan` compiles on CPU devices standing in for an accelerator."""
    kernel = resolve(implementation, platform, dtype, length)
    return implementation if platform in NATIVE.get(kernel, (platform,)) else "auto"


def compiled_platform() -> str:
    """The platform of the devices being compiled for: the mesh's inside a sharded function
    (compile-only TPU devices included), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def causal_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     segments_bt: jax.Array | None = None, implementation: str = "auto",
                     blocks: int = QUERY_BLOCKS) -> jax.Array:
    """Each position attends to itself and the positions before it, within its own segment
    when `segments_bt` says which example of a packed row each position belongs to. Query head
    n reads key/value head n // (N / Kv) (grouped-query attention)."""
    platform = compiled_platform()
    kernel = resolve(implementation, platform, q_btnh.dtype, q_btnh.shape[1])
    if kernel == "cudnn":
        if platform not in GPU_PLATFORMS:
            raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU, but this computation "
                              f"is compiled for {platform}; use model.attention=auto")
        if jnp.dtype(q_btnh.dtype) not in HALF_DTYPES:
            raise ConfigError(f"model.attention=cudnn computes in bfloat16 or float16, not "
                              f"{jnp.dtype(q_btnh.dtype)}; set model.dtype=bfloat16 or use "
                              "model.attention=auto")
        return library_attention(q_btnh, k_btkh, v_btkh, segments_bt, "cudnn")
    if kernel == "dot_product":
        return library_attention(q_btnh, k_btkh, v_btkh, segments_bt, None)
    if kernel == "splash":
        return splash_attention(q_btnh, k_btkh, v_btkh, segments_bt, interpret=platform != "tpu")
    return blocked_attention(q_btnh, k_btkh, v_btkh, segments_bt, blocks)


def library_attention(q_btnh, k_btkh, v_btkh, segments_bt, implementation: str | None) -> jax.Array:
    """`jax.nn.dot_product_attention`: XLA's (`implementation=None`) or cuDNN's fused kernel."""
    same_segment = None if segments_bt is None else (
        segments_bt[:, None, :, None] == segments_bt[:, None, None, :])  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=same_segment,
                                        is_causal=True, implementation=implementation)


def blocked_attention(q_btnh, k_btkh, v_btkh, segments_bt, blocks: int = QUERY_BLOCKS) -> jax.Array:
    """Queries in `blocks` row blocks; values equal the unblocked softmax: a masked score
    contributes an exact zero either way."""
    b, t, n, h = q_btnh.shape
    kv = k_btkh.shape[2]
    g = n // kv
    # heads before time, so every product below is a plain batch of [rows, H] x [H, keys]
    q_bkgth = jnp.transpose((q_btnh * h**-0.5).reshape(b, t, kv, g, h), (0, 2, 3, 1, 4))
    k_bksh = jnp.transpose(k_btkh, (0, 2, 1, 3))
    v_bksh = jnp.transpose(v_btkh, (0, 2, 1, 3))
    visible_bts = jnp.tril(jnp.ones((t, t), bool))[None]
    if segments_bt is not None:
        visible_bts = visible_bts & (segments_bt[:, :, None] == segments_bt[:, None, :])
    size = -(-t // min(blocks, t))
    outs = []
    for begin in range(0, t, size):
        rows, keys = slice(begin, min(begin + size, t)), slice(0, min(begin + size, t))
        rows_n = rows.stop - rows.start
        q_bkmh = q_bkgth[:, :, :, rows].reshape(b, kv, g * rows_n, h)  # m: (group, row)
        scores = jnp.einsum("bkmh,bksh->bkms", q_bkmh, k_bksh[:, :, keys],
                            preferred_element_type=jnp.float32)
        visible = jnp.tile(visible_bts[:, None, rows, keys], (1, 1, g, 1))
        scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
        # the max only keeps exp in range; its gradient would be zero, so skip computing it
        scores = scores - lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        weights = jnp.exp(scores)
        probs = (weights / jnp.sum(weights, axis=-1, keepdims=True)).astype(v_bksh.dtype)
        out = jnp.einsum("bkms,bksh->bkmh", probs, v_bksh[:, :, keys])
        outs.append(out.reshape(b, kv, g, rows_n, h))
    out_bkgth = jnp.concatenate(outs, axis=3)
    return jnp.transpose(out_bkgth, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


def splash_attention(q_btnh, k_btkh, v_btkh, segments_bt, interpret: bool = False) -> jax.Array:
    """The Pallas splash kernel per example, under a mesh once per shard: a Pallas call is
    opaque to XLA's partitioner, which would otherwise gather every row and head onto each
    device. Rows split as the batch, heads as the key/value heads (so each shard keeps whole
    query groups)."""
    from slm.parallel.rules import logical_to_spec

    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_per_example, interpret=interpret)
    if mesh.empty or mesh.size == 1:
        return local(q_btnh, k_btkh, v_btkh, segments_bt)
    b, kv = q_btnh.shape[0], k_btkh.shape[2]
    rows = logical_to_spec(("batch",), (b,), mesh)[0]
    heads = logical_to_spec(("kv_heads",), (kv,), mesh)[0]
    qkv = PartitionSpec(rows, None, heads, None)
    if segments_bt is None:
        per_shard, args, specs = lambda q, k, v: local(q, k, v, None), (), ()
    else:
        per_shard, args, specs = local, (segments_bt,), (PartitionSpec(rows, None),)
    return jax.shard_map(per_shard, in_specs=(qkv,) * 3 + specs, out_specs=qkv,
                         check_vma=False)(q_btnh, k_btkh, v_btkh, *args)


def _splash_per_example(q_btnh, k_btkh, v_btkh, segments_bt, interpret: bool) -> jax.Array:
    """Splash over one device's rows. The kernel wants `[heads, T, H]` per example, T a
    multiple of its tile, and unscaled scores; rows are zero-padded at the end, which no
    real query sees (causal), and the padded outputs are dropped."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q_btnh.shape
    padded = -(-t // KERNEL_BLOCK) * KERNEL_BLOCK
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    q_bnth = jnp.transpose(pad(q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype)), (0, 2, 1, 3))
    k_bkth, v_bkth = (jnp.transpose(pad(x), (0, 2, 1, 3)) for x in (k_btkh, v_btkh))
    kernel = _splash_kernel(n, padded, interpret)
    if segments_bt is None:
        out_bnth = jax.vmap(kernel)(q_bnth, k_bkth, v_bkth)
    else:
        segments_bt = jnp.pad(segments_bt, ((0, 0), (0, padded - t)), mode="edge")
        def per_example(q, k, v, s):
            return kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))

        out_bnth = jax.vmap(per_example)(q_bnth, k_bkth, v_bkth, segments_bt)
    return jnp.transpose(out_bnth, (0, 2, 1, 3))[:, :t]


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, length: int, interpret: bool):
    """A causal splash kernel for `heads` query heads over `length` (a multiple of
    `KERNEL_BLOCK`); built once per shape (its block tables are computed on the host)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = next(size for size in SPLASH_BLOCKS if length % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    with jax.ensure_compile_time_eval():  # its tables are constants, not values of this trace
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)
