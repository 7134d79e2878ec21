"""Activation-by-weight products whose weight gradients run on XLA:CPU's fast matmul path.

The weight gradient of `x @ w` contracts the token axis, which is the major axis of both `x`
and the incoming gradient. XLA:CPU hands such transposed-operand matmuls to a slower kernel
and transposes the larger operand first, once per weight; in the 30M benchmark's train step
those matmuls and transposes took a third of the step. Here the backward pass transposes `x`
itself, once for all the weights it meets (q/k/v, gate/up), behind an optimization barrier so
XLA cannot fold the transpose back into the matmuls: every weight gradient is then a plain
row-major `x^T @ g`. Values and gradients are those of `x @ w`.

`dense_rows` does the same for a weight stored `[out, in]` (a tied embedding table read as the
output head), whose gradient `g^T @ x` would transpose the `[tokens, vocab]` logit gradient:
it computes `(x^T @ g)^T` instead, transposing `x` and the table-sized result, both far smaller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@jax.custom_vjp
def _matmuls(x_mk: jax.Array, ws_kn: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(x_mk @ w for w in ws_kn)


def _forward(x_mk, ws_kn):
    return _matmuls(x_mk, ws_kn), (x_mk, ws_kn)


def _backward(saved, gs_mn):
    x_mk, ws_kn = saved
    dx_mk = sum(g @ w.T for g, w in zip(gs_mn, ws_kn))
    x_km = lax.optimization_barrier(x_mk.T)
    return dx_mk, tuple(x_km @ g for g in gs_mn)


_matmuls.defvjp(_forward, _backward)


def dense(x: jax.Array, *ws: jax.Array) -> tuple[jax.Array, ...]:
    """`x`'s last axis contracted with the first axis of each weight: `[..., K] x [K, ...]`."""
    x_mk = x.reshape(-1, x.shape[-1])
    ys = _matmuls(x_mk, tuple(w.reshape(w.shape[0], -1) for w in ws))
    return tuple(y.reshape(*x.shape[:-1], *w.shape[1:]) for y, w in zip(ys, ws))


def dense_side_by_side(x: jax.Array, *ws: jax.Array) -> tuple[jax.Array, ...]:
    """`dense` as one product with the weights side by side, for decode steps.

    A decode step reads every weight once per token, and XLA:CPU streams a matrix-vector
    product over one 3 MB matrix at ~42 GB/s but over 1 MB ones at ~29 GB/s (each product pays
    a fixed start): side by side, q/k/v made the 30M benchmark's decode step 8-9% faster, while
    gate/up (2.9 MB each) got slower as one 5.8 MB product, so only attention uses this. Inside
    the decode loop the side-by-side copy is loop-invariant: XLA hoists it out of the loop and
    makes it once per call (on a mesh that shards heads, that copy is also where the weights
    are resharded, once per call rather than per step)."""
    flat = [w.reshape(w.shape[0], -1) for w in ws]
    y = x @ jnp.concatenate(flat, axis=1)
    parts = jnp.split(y, np.cumsum([f.shape[1] for f in flat])[:-1], axis=-1)
    return tuple(part.reshape(*x.shape[:-1], *w.shape[1:]) for part, w in zip(parts, ws))


@jax.custom_vjp
def _matmul_rows(x_mk: jax.Array, w_nk: jax.Array) -> jax.Array:
    # an einsum, not `x @ w.T`: given the transpose, XLA:CPU fused the decode head's
    # matrix-vector product into a loop 15% slower than its matmul
    return jnp.einsum("mk,nk->mn", x_mk, w_nk)


def _rows_forward(x_mk, w_nk):
    return _matmul_rows(x_mk, w_nk), (x_mk, w_nk)


def _rows_backward(saved, g_mn):
    x_mk, w_nk = saved
    x_km = lax.optimization_barrier(x_mk.T)
    return g_mn @ w_nk, (x_km @ g_mn).T


_matmul_rows.defvjp(_rows_forward, _rows_backward)


def dense_rows(x: jax.Array, w_nk: jax.Array) -> jax.Array:
    """`x`'s last axis contracted with the last axis of `w_nk`: `[..., K] x [N, K] -> [..., N]`."""
    y = _matmul_rows(x.reshape(-1, x.shape[-1]), w_nk)
    return y.reshape(*x.shape[:-1], w_nk.shape[0])
