"""LLaMA-Omni's speech decoder as a head kind: units from the LM's final states of a reply.

Each final state of a reply's text is upsampled λ times (repeated), a small causal
Transformer runs over the frames of one reply, and a linear layer maps every frame to the
units or a blank; CTC scores the frames against the reply's de-duplicated units, so nothing
has to align units with text tokens (LLaMA-Omni: λ = 25, 2 layers, 1000 units + blank).
Unlike LLaMA-Omni, each copy also gets a learned embedding of its index within the state:
plain copies differ only through RoPE inside attention, too little to emit different units
from one state, and on the acceptance dialogues (tests/test_strategy_acceptance.py) CTC
stalled at 0.16 nats per unit without it and reached 3e-4 with it.

The kind owns λ streams, all over the unit range, laid out by the `text_driven` strategy: the
block of λ slots under step t+1 belongs to the state at t (every head reads step t+1's
targets from the state at t), a weighted block marks a state that speaks, and a reply's
units are the unit ids of its blocks in reading order (step by step, slot by slot). Its
streams are never inputs (`inputs = False`): the LM does not read units it did not produce.

Training scores each reply alone, also in rows packed from several examples: the speaking
states of a row are gathered to the front (at most `max_states` of them, the loss's static
size) and each reply's last state gets one extra frame that must emit a separator label, so
the row's CTC is exactly the sum of its replies' CTCs; the decoder attends within a reply.

Decoding (`SpeakingHead`): each spoken state's λ frames go through the decoder with a KV
cache of the reply's frames, one per row, and CTC greedy (argmax, collapse repeats also
across states, drop blanks) appends the new units. The decoder is causal, so no state's
units depend on later states: decoding state by state gives the whole reply's greedy units,
and a streaming caller may take them every Ω text tokens or at any other pace.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax import lax

from slm.errors import ConfigError
from slm.model.cache import LayerCache
from slm.model.decoder import DecoderStack, StackSpec
from slm.model.head_kinds import HeadKind, StreamLosses, register_head_kind
from slm.model.heads import to_flat, to_local
from slm.model.lm import segment_positions

NEG = -1e9  # the logit of a class a frame may not emit


@dataclasses.dataclass(frozen=True)
class CTCUnitsOptions:
    num_layers: int = 2  # LLaMA-Omni: 2 Llama layers
    d_model: int = 128
    num_heads: int = 4
    mlp_dim: int = 384
    max_states: int = 64  # speaking states of one packed row the loss scores: its static size
    #                      (CTC costs O((max_states * λ)^2) per row); a reply past it is left
    #                      out of the loss and its units are counted in `invalid_targets`


@struct.dataclass
class UnitDecodeState:
    """What decoding carries from state to state, per row."""

    cache: LayerCache  # the reply's frames: keys [B, L, 1, Kv, F, H], values [B, L, 1, Kv, H, F]
    frames: jax.Array  # int32 [B]: frames spoken so far (the next cache slot)
    last: jax.Array  # int32 [B]: the last frame's greedy class (blank before the first)
    units: jax.Array  # int32 [B, F]: local unit ids in order, -1 from `count` on
    count: jax.Array  # int32 [B]


class CTCUnits(HeadKind):
    Options = CTCUnitsOptions
    inputs = False

    def __init__(self, streams, d_model: int, options: CTCUnitsOptions, rngs: nnx.Rngs):
        super().__init__(streams, d_model, options, rngs)
        if len({s.spans for s in streams}) != 1:
            raise ConfigError(f"head ctc_units: its streams {[s.name for s in streams]} must "
                              "all hold the same ranges (the unit slots of one reply)")
        if options.d_model % options.num_heads or options.max_states < 1:
            raise ConfigError(f"model.head_options.ctc_units: d_model={options.d_model} must be "
                              f"a multiple of num_heads={options.num_heads}, and max_states >= 1")
        self.upsample = len(streams)  # λ: one stream per frame of a state
        self.blank = streams[0].size  # local ids: units 0..V-1, then the blank
        head_dim = options.d_model // options.num_heads
        self.spec = StackSpec(options.d_model, options.num_layers, options.num_heads,
                              options.num_heads, head_dim, options.mlp_dim)
        self.w_in = nnx.Param(jax.random.normal(rngs.params(), (d_model, options.d_model))
                              * d_model**-0.5, out_sharding=("embed", None))
        self.copy = nnx.Param(jax.random.normal(rngs.params(), (self.upsample, options.d_model)),
                              out_sharding=(None, "embed"))
        self.decoder = DecoderStack(self.spec, rngs, scan=False)
        self.w_out = nnx.Param(jax.random.normal(rngs.params(), (options.d_model, self.blank + 1))
                               * options.d_model**-0.5, out_sharding=("embed", "vocab"))

    # -- the network ------------------------------------------------------------------------
    def _frames(self, h_bsd: jax.Array) -> jax.Array:
        """States -> their λ frames each, `[B, S * λ, d]`: copies told apart by their index
        embedding; in float32 (the head is small)."""
        x_bsd = jnp.einsum("bsd,de->bse", h_bsd.astype(jnp.float32), self.w_in[...])
        x_bsle = x_bsd[:, :, None] + self.copy[...]
        return x_bsle.reshape(x_bsd.shape[0], -1, x_bsd.shape[-1])

    def _logits(self, y_bfd: jax.Array) -> jax.Array:
        return jnp.einsum("bfd,dv->bfv", y_bfd, self.w_out[...])

    def frame_logits(self, h_bsd: jax.Array, reply_bs: jax.Array) -> jax.Array:
        """Units + blank logits `[B, S * λ, V + 1]` of states whose reply ids `reply_bs` say
        which reply each belongs to (frames attend within their reply; 0: no reply)."""
        reply_bf = jnp.repeat(reply_bs, self.upsample, axis=1)
        y_bfd, _ = self.decoder(self._frames(h_bsd), segment_positions(reply_bf),
                                segments_bt=reply_bf)
        return self._logits(y_bfd)

    # -- training ---------------------------------------------------------------------------
    def loss(self, h_btd, targets_bkt, weights_bkt, segments_bt) -> StreamLosses:
        lam, blank = self.upsample, self.blank
        sep = blank + 1  # the label between replies, emitted by each reply's extra frame
        size = min(self.options.max_states, h_btd.shape[1])
        reply_bt, end_bt = _replies(weights_bkt[:, 0] > 0, segments_bt)
        local_btl = to_local(jnp.swapaxes(targets_bkt, 1, 2), self.streams[0].spans)
        # a reply is scored only if all of it fits in the first `size` speaking states
        rank_bt = jnp.cumsum(reply_bt > 0, axis=1) - 1
        end_rank_bt = lax.cummin(jnp.where(end_bt, rank_bt, size), axis=1, reverse=True)
        fits_bt = (reply_bt > 0) & (end_rank_bt < size)
        dropped = jnp.sum(((reply_bt > 0) & ~fits_bt)[..., None] & (local_btl >= 0))

        order_bs = jnp.argsort(~fits_bt, axis=1, stable=True)[:, :size]
        take = lambda x: jnp.take_along_axis(x, order_bs, axis=1)  # noqa: E731
        kept_bs = take(fits_bt)
        reply_bs, end_bs = jnp.where(kept_bs, take(reply_bt), 0), take(end_bt) & kept_bs
        h_bsd = jnp.take_along_axis(h_btd, order_bs[..., None], axis=1)
        labels_bsl = jnp.where(kept_bs[..., None],
                               jnp.take_along_axis(local_btl, order_bs[..., None], axis=1), -1)

        b = h_btd.shape[0]
        logits = self.frame_logits(h_bsd, reply_bs).reshape(b, size, lam, blank + 1)
        logits = jnp.concatenate([logits, jnp.full((b, size, lam, 1), NEG)], axis=-1)
        sep_frame = jnp.full((b, size, 1, blank + 2), NEG).at[..., sep].set(0.0)
        logits = jnp.concatenate([logits, sep_frame], axis=2).reshape(b, -1, blank + 2)
        frame_pad = jnp.concatenate([jnp.repeat(~kept_bs[..., None], lam, axis=2),
                                     ~end_bs[..., None]], axis=2).reshape(b, -1)
        labels = jnp.concatenate([labels_bsl, jnp.where(end_bs, sep, -1)[..., None]],
                                 axis=2).reshape(b, -1)
        labels = jnp.take_along_axis(labels, jnp.argsort(labels < 0, axis=1, stable=True), axis=1)
        per_row = optax.ctc_loss(logits, frame_pad.astype(jnp.float32), jnp.maximum(labels, 0),
                                 (labels < 0).astype(jnp.float32), blank_id=blank)
        units = jnp.sum(labels_bsl >= 0).astype(jnp.float32)
        return {self.streams[0].name: (jnp.sum(per_row), units, dropped)}

    # -- decoding (slm.model.head_kinds.SpeakingHead) ------------------------------------------
    def decode_init(self, batch: int, steps: int) -> UnitDecodeState:
        frames = steps * self.upsample
        one = LayerCache.zeros(self.spec.num_layers, 1, frames, self.spec.num_kv_heads,
                               self.spec.head_dim)
        return UnitDecodeState(
            cache=jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), one),
            frames=jnp.zeros((batch,), jnp.int32), last=jnp.full((batch,), self.blank, jnp.int32),
            units=jnp.full((batch, frames), -1, jnp.int32), count=jnp.zeros((batch,), jnp.int32))

    def decode_step(self, carry: UnitDecodeState, h_bd: jax.Array,
                    speak_b: jax.Array) -> tuple[UnitDecodeState, jax.Array]:
        lam = self.upsample
        graphdef, state = nnx.split(self.decoder)

        def one_row(x_fd, cache, start):  # each row writes its cache at its own frame count
            positions = (start + jnp.arange(lam))[None]
            y_bfd, cache = nnx.merge(graphdef, state)(x_fd[None], positions, cache, start)
            return y_bfd[0], cache

        y_bfd, cache = jax.vmap(one_row)(self._frames(h_bd[:, None]), carry.cache, carry.frames)
        best_bf = jnp.argmax(self._logits(y_bfd), axis=-1).astype(jnp.int32)
        prev_bf = jnp.concatenate([carry.last[:, None], best_bf[:, :-1]], axis=1)
        new_bf = speak_b[:, None] & (best_bf != self.blank) & (best_bf != prev_bf)
        slot_bf = jnp.where(new_bf, carry.count[:, None] + jnp.cumsum(new_bf, axis=1) - 1,
                            carry.units.shape[1])  # out of range: dropped
        rows = jnp.arange(best_bf.shape[0])[:, None]
        units = carry.units.at[rows, slot_bf].set(best_bf, mode="drop")
        count = carry.count + jnp.sum(new_bf, axis=1)
        # a row that does not speak keeps its frame count, so its next frames overwrite the
        # slots written now before anything reads them
        carry = UnitDecodeState(cache, carry.frames + lam * speak_b.astype(jnp.int32),
                                jnp.where(speak_b, best_bf[:, -1], carry.last), units, count)
        return carry, count > 0

    def decoded(self, carry: UnitDecodeState, steps: int) -> jax.Array:
        """Units in reading order over blocks of λ slots, block t under step t + 1, as the
        strategy lays them out."""
        b, lam = carry.units.shape[0], self.upsample
        flat = jnp.where(carry.units >= 0, to_flat(carry.units, self.streams[0].spans), -1)
        blocks_bkt = jnp.swapaxes(flat.reshape(b, steps, lam), 1, 2)
        return jnp.pad(blocks_bkt, ((0, 0), (0, 0), (1, 0)), constant_values=-1)[:, :, :steps]


def _replies(spoken_bt: jax.Array, segments_bt: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(reply id of each position: 1, 2, ... along a row for each run of speaking states of
    one example, 0 elsewhere; whether the position is its reply's last state)."""
    follows_bt = jnp.pad(spoken_bt[:, :-1], ((0, 0), (1, 0)))  # the position before speaks
    if segments_bt is not None:
        follows_bt &= jnp.pad(segments_bt[:, 1:] == segments_bt[:, :-1], ((0, 0), (1, 0)))
    continues_bt = spoken_bt & follows_bt
    reply_bt = jnp.cumsum(spoken_bt & ~continues_bt, axis=1) * spoken_bt
    end_bt = spoken_bt & ~jnp.pad(continues_bt[:, 1:], ((0, 0), (0, 1)))
    return reply_bt.astype(jnp.int32), end_bt


register_head_kind("ctc_units", CTCUnits)
