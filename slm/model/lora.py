"""LoRA: a trainable low-rank update `W + (alpha / rank) * A @ B` beside chosen projections.

`B` starts at zero, so a model with fresh adapters computes exactly what its base computed, and
only `A` and `B` need gradients and optimizer state (`train.trainable: [lora]`). Adapters are
`nnx.LoRAParam`s inside slm's own projections, named like the weights they follow plus a
`lora_rank` axis, so they shard by the same rules and travel in the same pure-dict parameters
as everything else; `merge` folds them into the base weights for sampling and export.

Why not qwix (0.1.8, evaluated first): it patches `dot_general` / `einsum` during a module's
call, finds the weight of each product by tracing the operand back to an `nnx.Param` of the
calling module (else by a unique shape match), and creates the adapter lazily on that first
call. Three parts of slm defeat that: (1) slm's projections run through
`slm.model.matmul.dense`, a `custom_vjp` over weights reshaped to 2-D and batched (q/k/v in
one call), whose operands are fresh tracers: q/k/v/o match no parameter and gate/up share a
shape, so qwix would silently add no adapter to them; (2) the decoder's layers are stacked and
applied by `lax.scan` over a per-layer `nnx.merge` (slm.model.decoder), so parameters created
inside the body never reach the stacked state (MaxText needed dedicated scan appliers for
this, AI-Hypercomputer/maxtext#5129); (3) qwix derives an adapter's sharding from the concrete
base array, while slm lays out every parameter from logical names before any exists
(slm.train.state). It also has no merge into the base weights, which sampling and export need.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from slm.config import LoraConfig
from slm.errors import ConfigError
from slm.model.matmul import dense

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TARGETS = (*PROJECTIONS, *(f"depth.{p}" for p in (*PROJECTIONS, "in", "head")), "heads")
# the weight each adapter updates, a sibling of its `lora` dict in the parameters
WEIGHTS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
           "down": "w_down", "in": "in_proj", "head": "head", "heads": "w"}

Shape = tuple[tuple[int, ...], tuple[str, ...]]  # dimensions and their logical names


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapters of one part of the model (hashable, so it can live in a StackSpec)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # names within the part: "q", "in", "heads", ...
    prefix: str = ""  # how the config names this part's targets ("depth.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_specs(cfg: LoraConfig, *, has_depth: bool, tied: bool) -> dict[str, LoraSpec | None]:
    """Adapters of the temporal `decoder`, the `depth` decoder and the temporal `heads`; every
    target must exist in this model."""
    parts: dict[str, LoraSpec | None] = {"decoder": None, "depth": None, "heads": None}
    if cfg.rank == 0:
        return parts
    if cfg.rank < 0:
        raise ConfigError(f"model.lora.rank={cfg.rank}; use a positive rank, or 0 for no LoRA")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout={cfg.dropout}; choose a rate in [0, 1)")
    if not cfg.targets:
        raise ConfigError(f"model.lora.targets is empty; name projections ({', '.join(TARGETS)})"
                          " or set model.lora.rank=0")
    for i, target in enumerate(cfg.targets):
        if target not in TARGETS:
            raise ConfigError(f"model.lora.targets[{i}]={target!r} is not a projection of the "
                              f"model; choose from {', '.join(TARGETS)}")
        if target.startswith("depth.") and not has_depth:
            raise ConfigError(f"model.lora.targets[{i}]={target!r}: this model has no depth "
                              "decoder (no stream has head: depth); remove it from the targets")
        if target == "heads" and tied:
            raise ConfigError(f"model.lora.targets[{i}]='heads': tied heads are the embedding "
                              "table, which an adapter cannot be merged into without changing "
                              "the inputs too; set model.tie_embeddings=false or drop 'heads'")

    def spec(targets: tuple[str, ...], prefix: str = "") -> LoraSpec:
        return LoraSpec(cfg.rank, cfg.alpha, cfg.dropout, targets, prefix)

    decoder = tuple(t for t in cfg.targets if t in PROJECTIONS)
    depth = tuple(t.removeprefix("depth.") for t in cfg.targets if t.startswith("depth."))
    parts["decoder"] = spec(decoder) if decoder else None
    parts["depth"] = spec(depth, "depth.") if depth else None
    parts["heads"] = spec(("heads",)) if "heads" in cfg.targets else None
    return parts


class Adapter(nnx.Module):
    """`(x @ a) @ b` for one weight `[in..., out...]` (after any leading per-step axis)."""

    def __init__(self, spec: LoraSpec, name: str, fan_in: Shape, fan_out: Shape,
                 lead: Shape, rngs: nnx.Rngs, param_dtype: str):
        (in_shape, in_names), (out_shape, out_names) = fan_in, fan_out
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        if spec.rank > min(n_in, n_out):
            raise ConfigError(
                f"model.lora.rank={spec.rank} exceeds projection '{spec.prefix}{name}' "
                f"({n_in} -> {n_out}): its update has rank at most {min(n_in, n_out)}; choose "
                f"model.lora.rank <= {min(n_in, n_out)} or drop '{spec.prefix}{name}' from "
                "model.lora.targets")
        dtype, (lead_shape, lead_names) = jnp.dtype(param_dtype), lead
        self.in_ndim = len(in_shape)
        a = jax.random.normal(rngs.params(), (*lead_shape, *in_shape, spec.rank), dtype)
        self.a = nnx.LoRAParam(a * n_in**-0.5,
                               out_sharding=(*lead_names, *in_names, "lora_rank"))
        self.b = nnx.LoRAParam(jnp.zeros((*lead_shape, spec.rank, *out_shape), dtype),
                               out_sharding=(*lead_names, "lora_rank", *out_names))

    def flat_a(self, dtype) -> jax.Array:
        """`a` with its input axes merged: `[(steps,) in, rank]`."""
        a = self.a[...].astype(dtype)
        lead = a.ndim - 1 - self.in_ndim
        return a.reshape(*a.shape[:lead], -1, a.shape[-1])

    def at(self, x: jax.Array, step: int | jax.Array, scale: float) -> jax.Array:
        """The update of per-step weight `step` for `x` `[B, in]` (a decode step): `[B, out...]`."""
        a, b = self.flat_a(x.dtype)[step], self.b[...][step].astype(x.dtype)
        return dense((x @ a) * scale, b)[0]


def adapters(spec: LoraSpec | None, shapes: dict[str, tuple[Shape, Shape]], rngs: nnx.Rngs,
             param_dtype: str, steps: int | None = None) -> nnx.Dict | None:
    """Adapters for the `spec` targets among one module's projections (`shapes`: name -> fan in
    and fan out), with a leading `depth_step` axis for per-step weights; None if none."""
    names = [n for n in shapes if spec is not None and n in spec.targets]
    if not names:
        return None
    lead = ((steps,), ("depth_step",)) if steps is not None else ((), ())
    return nnx.Dict({n: Adapter(spec, n, *shapes[n], lead, rngs, param_dtype) for n in names})


def site_key(key: jax.Array | None, site: int) -> jax.Array | None:
    """The dropout key of one place in a module (None stays None: no dropout)."""
    return None if key is None else jax.random.fold_in(key, site)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on the adapters' input; a no-op without a key (sampling, evaluation)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def add_updates(found: nnx.Dict | None, spec: LoraSpec | None, names: Sequence[str],
                ys: Sequence[jax.Array], x: jax.Array, step: int | jax.Array | None = None,
                key: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """`ys`, the base projections of `x` named `names`, plus their adapters' updates.

    One dropout mask serves all projections of the same input (q/k/v, gate/up), so their `a`
    products share one pass, as the base weights do in `slm.model.matmul.dense`. `step`: per-step
    weights, `x`'s axis 1 indexing steps from `step` (as slm.model.decoder's `_project`)."""
    present = [n for n in names if found is not None and n in found]
    if not present:
        return tuple(ys)
    x = dropout(x, spec.dropout, key)
    chosen = [found[n] for n in present]
    if step is None:
        xas = dense(x, *(ad.flat_a(x.dtype) for ad in chosen))
        updates = [dense(xa * spec.scale, ad.b[...].astype(x.dtype))[0]
                   for xa, ad in zip(xas, chosen)]
    else:
        updates = [_per_step(x, ad, step, spec.scale) for ad in chosen]
    by_name = dict(zip(present, updates))
    return tuple(y + by_name[n].astype(y.dtype) if n in by_name else y for n, y in zip(names, ys))


def _per_step(x_bti: jax.Array, ad: Adapter, step: int | jax.Array, scale: float) -> jax.Array:
    t = x_bti.shape[1]
    a_tir = lax.dynamic_slice_in_dim(ad.flat_a(x_bti.dtype), step, t, axis=0)
    b = lax.dynamic_slice_in_dim(ad.b[...].astype(x_bti.dtype), step, t, axis=0)
    xa_btr = jnp.einsum("bti,tir->btr", x_bti, a_tir) * scale
    y_bto = jnp.einsum("btr,tro->bto", xa_btr, b.reshape(t, b.shape[1], -1))
    return y_bto.reshape(*x_bti.shape[:2], *b.shape[2:])


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`w + scale * a @ b` in `w`'s shape and dtype; leading (layer, step) axes are batched."""
    lead = a.ndim + b.ndim - 2 - w.ndim
    a2 = a.astype(jnp.float32).reshape(*a.shape[:lead], -1, a.shape[-1])
    b2 = b.astype(jnp.float32).reshape(*b.shape[:lead + 1], -1)
    delta = jnp.matmul(a2, b2, precision=lax.Precision.HIGHEST).reshape(w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge(params: dict, cfg: LoraConfig) -> dict:
    """The parameters with every adapter folded into its weight and the adapters removed: the
    base model that computes what the adapted one computes (up to float rounding)."""
    if cfg.rank == 0:
        return params
    scale = cfg.alpha / cfg.rank
    out = {}
    for key, value in params.items():
        if key == "lora" or not isinstance(value, dict):
            out[key] = value
            continue
        out[key] = merge(value, cfg)
    for name, ad in params.get("lora", {}).items():
        out[WEIGHTS[name]] = merged_weight(params[WEIGHTS[name]], ad["a"], ad["b"], scale)
    out.pop("lora", None)
    return out


def without_lora(cfg: LoraConfig) -> LoraConfig:
    return dataclasses.replace(cfg, rank=0)
