"""Which Hugging Face tensor becomes which slm parameter, and how its axes move.

HF linear layers store `[out, in]` matrices with heads flattened into one axis; slm keeps
`[in, heads, head_dim]` einsum weights stacked over a leading `layers` axis. Every mapping
here is a pure reshape/transpose, so the import side returns numpy *views* of memory-mapped
files (nothing is read until a device shard is sliced out) and the export side is its exact
inverse.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from slm.config import ModelConfig

Fn = Callable[[np.ndarray], np.ndarray]
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
LAYER = "model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class LayerTensor:
    """One per-layer tensor: slm path under `decoder.layers`, HF name suffix, HF shape, and the
    two directions of its layout change."""

    path: tuple[str, ...]
    hf: str
    hf_shape: tuple[int, ...]
    to_slm: Fn
    to_hf: Fn

    def hf_name(self, layer: int) -> str:
        return LAYER.format(i=layer) + self.hf


def _in_heads(heads: int, h: int, d: int, name: str, path: tuple[str, ...]) -> LayerTensor:
    """q/k/v projections: HF `[heads*h, d]` <-> slm `[d, heads, h]`."""
    return LayerTensor(path, name, (heads * h, d),
                       lambda w: w.reshape(heads, h, d).transpose(2, 0, 1),
                       lambda t: t.transpose(1, 2, 0).reshape(heads * h, d))


def _bias(heads: int, h: int, name: str, path: tuple[str, ...]) -> LayerTensor:
    return LayerTensor(path, name, (heads * h,), lambda b: b.reshape(heads, h),
                       lambda t: t.reshape(heads * h))


def _matrix(shape: tuple[int, int], name: str, path: tuple[str, ...]) -> LayerTensor:
    """Plain linear layers: HF `[out, in]` <-> slm `[in, out]`."""
    return LayerTensor(path, name, shape, lambda w: w.T, lambda t: t.T)


def _vector(d: int, name: str, path: tuple[str, ...]) -> LayerTensor:
    return LayerTensor(path, name, (d,), lambda v: v, lambda t: t)


def layer_tensors(model: ModelConfig) -> list[LayerTensor]:
    d, n, k, f = model.d_model, model.num_heads, model.num_kv_heads, model.mlp_dim
    h = model.head_dim or d // n
    tensors = [
        _in_heads(n, h, d, "self_attn.q_proj.weight", ("attn", "wq")),
        _in_heads(k, h, d, "self_attn.k_proj.weight", ("attn", "wk")),
        _in_heads(k, h, d, "self_attn.v_proj.weight", ("attn", "wv")),
        LayerTensor(("attn", "wo"), "self_attn.o_proj.weight", (d, n * h),
                    lambda w: w.reshape(d, n, h).transpose(1, 2, 0),
                    lambda t: t.transpose(2, 0, 1).reshape(d, n * h)),
        _matrix((f, d), "mlp.gate_proj.weight", ("mlp", "w_gate")),
        _matrix((f, d), "mlp.up_proj.weight", ("mlp", "w_up")),
        _matrix((d, f), "mlp.down_proj.weight", ("mlp", "w_down")),
        _vector(d, "input_layernorm.weight", ("attn_norm", "scale")),
        _vector(d, "post_attention_layernorm.weight", ("mlp_norm", "scale")),
    ]
    if model.qkv_bias:
        tensors += [_bias(n, h, "self_attn.q_proj.bias", ("attn", "bq")),
                    _bias(k, h, "self_attn.k_proj.bias", ("attn", "bk")),
                    _bias(k, h, "self_attn.v_proj.bias", ("attn", "bv"))]
    return tensors
