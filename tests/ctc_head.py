"""A test-only head kind, registered from outside `slm/`: CTC over upsampled hidden states.

The shape of LLaMA-Omni's unit decoder, reduced to its loss: the states of the steps where a
stream it owns is weighted are upsampled `upsample` times, a linear layer maps them to the
stream's ids plus a blank, and CTC scores them against the stream's weighted ids in order.
It shows that a head of another shape than "one token per step" is one module plus a
registration; nothing in `slm/` knows about it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax
from flax import nnx

from slm.model.head_kinds import HeadKind, StreamLosses, register_head_kind
from slm.model.heads import to_local


@dataclasses.dataclass(frozen=True)
class UpsampledCTCOptions:
    upsample: int = 2  # states per target step (LLaMA-Omni: 25)


class UpsampledCTC(HeadKind):
    Options = UpsampledCTCOptions

    def __init__(self, streams, d_model, options, rngs: nnx.Rngs):
        super().__init__(streams, d_model, options, rngs)
        self.out = nnx.List([nnx.Linear(d_model, s.size + 1, rngs=rngs) for s in streams])

    def loss(self, h_btd, targets_bkt, weights_bkt, segments_bt) -> StreamLosses:
        losses = {}
        for q, (stream, out) in enumerate(zip(self.streams, self.out)):
            owned_bt = weights_bkt[:, q] > 0
            order_bt = jnp.argsort(~owned_bt, axis=1, stable=True)  # owned steps first, in order
            take = lambda x: jnp.take_along_axis(x, order_bt, axis=1)  # noqa: E731
            kept_bt = take(owned_bt)
            labels_bt = to_local(take(targets_bkt[:, q]), stream.spans)
            states = jnp.take_along_axis(h_btd, order_bt[..., None], axis=1)
            states = jnp.repeat(states, self.options.upsample, axis=1)
            logits = out(states.astype(jnp.float32))
            per_row = optax.ctc_loss(
                logits, jnp.repeat(~kept_bt, self.options.upsample, axis=1).astype(jnp.float32),
                jnp.maximum(labels_bt, 0), (~kept_bt).astype(jnp.float32), blank_id=stream.size)
            rows = jnp.any(kept_bt, axis=1)
            losses[stream.name] = (jnp.sum(jnp.where(rows, per_row, 0.0)),
                                   jnp.sum(kept_bt).astype(jnp.float32),
                                   jnp.sum(kept_bt & (labels_bt < 0)))
        return losses


register_head_kind("test_ctc", UpsampledCTC)
