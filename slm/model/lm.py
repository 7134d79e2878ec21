"""SpeechLM: K token streams in, one temporal decoder, a head per stream, optional depth decoder.

The model never knows which generation strategy produced its `[B, K, T]` grid: streams are
embedded and combined per step, the temporal decoder's output at step t predicts step t+1 of
every temporal stream, and the depth decoder predicts the depth streams of step t+1 in order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slm.config import ModelConfig
from slm.errors import ConfigError
from slm.model.cache import DecodeState, LayerCache
from slm.model.decoder import DecoderStack, StackSpec
from slm.model.depth import DepthDecoder
from slm.model.head_kinds import build_head_kinds, input_streams
from slm.model.heads import StreamEmbedding, TemporalHeads, to_local
from slm.model.lora import LoraSpec, lora_specs, site_key
from slm.model.precision import compute_dtype
from slm.model.speech_encoder import build_speech_encoder
from slm.model.speech_input import build_speech_input, project_steps
from slm.types import Spans, build_streams
from slm.vocab import Vocab


Features = tuple[jax.Array, jax.Array] | None  # speech frames [B, T, W, D] and mask [B, T, W]


@dataclasses.dataclass
class Outputs:
    temporal: list[jax.Array]  # per temporal stream: [B, T, V_k], position t predicts t+1
    depth: jax.Array | None  # [B, T-1, Q, C], position t predicts the depth streams at t+1
    hidden: jax.Array  # [B, T, D] the temporal decoder's final states (what head kinds read)


class SpeechLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab: Vocab, rngs: nnx.Rngs):
        self.streams = build_streams(cfg, vocab)
        self.temporal_index = tuple(i for i, s in enumerate(self.streams) if s.head == "temporal")
        self.depth_index = tuple(i for i, s in enumerate(self.streams) if s.head == "depth")
        self.dtype = jnp.dtype(compute_dtype(cfg.dtype))
        lora = lora_specs(cfg.lora, has_depth=bool(self.depth_index), tied=cfg.tie_embeddings)
        head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        self.spec = StackSpec(cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                              head_dim, cfg.mlp_dim, cfg.norm_eps, cfg.rope_theta,
                              param_dtype=cfg.param_dtype, qkv_bias=cfg.qkv_bias,
                              norm_plus_one=cfg.norm_plus_one, activation=cfg.mlp_activation,
                              attention=cfg.attention, lora=lora["decoder"])
        # streams a head kind predicts from the states alone are targets, never inputs
        self.input_index = input_streams(self.streams)
        self.embed = StreamEmbedding(vocab.size, len(self.input_index), cfg.d_model,
                                     cfg.stream_combine, rngs, cfg.param_dtype,
                                     cfg.d_model**0.5 if cfg.scale_embeddings else 1.0)
        self.decoder = DecoderStack(self.spec, rngs, scan=cfg.scan_layers, remat=cfg.remat)
        temporal = tuple(self.streams[i] for i in self.temporal_index)
        self.heads = TemporalHeads(temporal, cfg.d_model, cfg.tie_embeddings, rngs, cfg.param_dtype,
                                   lora["heads"])
        self.depth = self._build_depth(cfg, rngs, lora["depth"]) if self.depth_index else None
        self.speech_input = (build_speech_input(cfg.speech_input, cfg.d_model, rngs)
                             if cfg.speech_input.dim else None)
        self.speech_encoder = build_speech_encoder(cfg.speech_input, rngs)
        self.head_kind_index, self.head_kinds = build_head_kinds(self.streams, cfg.d_model,
                                                                 cfg.head_options, rngs)

    def _build_depth(self, cfg: ModelConfig, rngs: nnx.Rngs,
                     lora: LoraSpec | None) -> DepthDecoder:
        d = cfg.depth
        depth_streams = [self.streams[i] for i in self.depth_index]
        if d.num_layers < 1:
            raise ConfigError("model.depth.num_layers must be >= 1 when a stream has head: depth")
        sizes = {s.size for s in depth_streams}
        if len(sizes) != 1:
            raise ConfigError(f"model.streams: depth streams must have equal vocab sizes, got {sizes}")
        by_name = {s.name: s for s in self.streams}
        if d.cond_stream not in by_name or by_name[d.cond_stream].head != "temporal":
            raise ConfigError(
                f"model.depth.cond_stream={d.cond_stream!r} must name a temporal stream "
                f"(one of {[s.name for s in self.streams if s.head == 'temporal']})"
            )
        inputs = (by_name[d.cond_stream].spans, *(s.spans for s in depth_streams[:-1]))
        spec = StackSpec(d.d_model, d.num_layers, d.num_heads, d.num_kv_heads,
                         d.d_model // d.num_heads, d.mlp_dim, cfg.norm_eps, rope_theta=None,
                         steps=len(depth_streams), param_dtype=cfg.param_dtype,
                         attention=cfg.attention, lora=lora)
        self.depth_cond_index = self.streams.index(by_name[d.cond_stream])
        return DepthDecoder(spec, cfg.d_model, inputs, sizes.pop(), rngs, self.dtype)

    def embed_inputs(self, tokens_bkt: jax.Array, features: Features = None) -> jax.Array:
        """Each step's input: its streams' embeddings summed, plus its projected speech frames
        (`features`: `[B, T, W, D]` frames and their `[B, T, W]` mask) where it has them."""
        if len(self.input_index) < len(self.streams):
            tokens_bkt = tokens_bkt[:, np.array(self.input_index)]
        x_btd = self.embed(tokens_bkt, self.dtype)
        if features is None:
            return x_btd
        if self.speech_input is None:
            raise ConfigError("this model has no speech input (model.speech_input.dim=0), so it "
                              "cannot hear features; train it with strategy.user_input=features")
        frames_btwd, mask_btw = features
        if self.speech_encoder is not None:
            frames_btwd = self.speech_encoder(frames_btwd, mask_btw)
        return x_btd + project_steps(self.speech_input, frames_btwd, mask_btw, self.dtype)

    # -- training ---------------------------------------------------------------------------
    def __call__(self, tokens_bkt: jax.Array, segments_bt: jax.Array | None = None,
                 features: Features = None, dropout_key: jax.Array | None = None) -> Outputs:
        """`segments_bt`: for rows packed from several examples, the example of each position
        (positions then count from each example's start and attend within it, as each would
        alone); None for one sequence per row. `dropout_key`: LoRA dropout (training only)."""
        if segments_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bkt.shape[2]), tokens_bkt.shape[::2])
        else:
            positions_bt = segment_positions(segments_bt)
        with jax.named_scope("inputs"):  # names in profiler traces
            x_btd = self.embed_inputs(tokens_bkt, features)
        with jax.named_scope("decoder"):
            h_btd, _ = self.decoder(x_btd, positions_bt, segments_bt=segments_bt,
                                    dropout_key=site_key(dropout_key, 0))
        with jax.named_scope("heads"):
            temporal = self.heads(h_btd, self.embed.table[...], site_key(dropout_key, 1))
        depth = None
        if self.depth is not None:
            with jax.named_scope("depth_decoder"):
                depth = self.depth(h_btd[:, :-1], self._depth_inputs(tokens_bkt[:, :, 1:]),
                                   site_key(dropout_key, 2))
        return Outputs(temporal, depth, h_btd)

    def _depth_inputs(self, tokens_bkt: jax.Array) -> jax.Array:
        """Per frame, the token one level coarser than each depth step: `[B, T, Q]`."""
        rows = (self.depth_cond_index, *self.depth_index[:-1])
        return jnp.moveaxis(tokens_bkt[:, jnp.array(rows)], 1, 2)

    def loss(self, tokens_bkt: jax.Array, weights_bkt: jax.Array,
             segments_bt: jax.Array | None = None, features: Features = None,
             dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
        """Summed weighted cross-entropy of every stream's next token, and the weight total;
        with `segments_bt`, no example is asked to predict the next one's first token.

        Returns sums, not means, so microbatches and devices combine exactly.
        """
        out = self(tokens_bkt, segments_bt, features, dropout_key)
        targets_bkt, w_bkt = tokens_bkt[:, :, 1:], weights_bkt[:, :, 1:].astype(jnp.float32)
        if segments_bt is not None:
            w_bkt = w_bkt * (segments_bt[:, None, 1:] == segments_bt[:, None, :-1])
        per_stream = {}
        for k, logits in self.next_logits(out).items():
            per_stream[self.streams[k].name] = _xent(logits, targets_bkt[:, k],
                                                     self.streams[k].spans, w_bkt[:, k])
        for kind, ks in self.head_kind_index.items():
            rows = jnp.array(ks)
            per_stream |= self.head_kinds[kind].loss(
                out.hidden[:, :-1], targets_bkt[:, rows], w_bkt[:, rows],
                None if segments_bt is None else segments_bt[:, 1:])
        loss_sum = sum(v[0] for v in per_stream.values())
        weight_sum = sum(v[1] for v in per_stream.values())
        metrics = {f"loss_sum/{name}": v[0] for name, v in per_stream.items()}
        metrics |= {f"weight_sum/{name}": v[1] for name, v in per_stream.items()}
        metrics["invalid_targets"] = sum(v[2] for v in per_stream.values())
        return loss_sum, weight_sum, metrics

    def next_logits(self, out: Outputs) -> dict[int, jax.Array]:
        """Logits `[B, T-1, V_k]` of each token-predicting stream (temporal heads, then depth
        heads) for steps 1..T-1, by stream index: what the loss and post-training score."""
        logits = {k: lg[:, :-1] for lg, k in zip(out.temporal, self.temporal_index)}
        return logits | {k: out.depth[:, :, q] for q, k in enumerate(self.depth_index)}

    def token_logprobs(self, tokens_bkt: jax.Array, segments_bt: jax.Array | None = None,
                       features: Features = None) -> jax.Array:
        """`[B, K, T-1]`: log p(token at step t+1 | steps <= t) of every stream, teacher-forced,
        at temperature 1 over the stream's whole head; 0 for streams without a token head
        (plug-in head kinds) and for ids outside a stream's spans. Policy-gradient and
        preference losses score sampled replies with these."""
        out = self(tokens_bkt, segments_bt, features)
        rows = [jnp.zeros(tokens_bkt.shape[::2], jnp.float32)[:, 1:]] * len(self.streams)
        for k, logits in self.next_logits(out).items():
            logp_bt, valid_bt = token_logprobs(logits, tokens_bkt[:, k, 1:], self.streams[k].spans)
            rows[k] = jnp.where(valid_bt, logp_bt, 0.0)
        return jnp.stack(rows, axis=1)

    # -- decoding ---------------------------------------------------------------------------
    def init_decode_state(self, batch: int, capacity: int, per_layer: bool = False,
                          start_b: jax.Array | None = None) -> DecodeState:
        """`per_layer`: one cache per layer, for `decode` with `layers`. `start_b`: how many
        slots of each row's prompt are left padding (default none)."""
        make = LayerCache.per_layer if per_layer else LayerCache.zeros
        cache = make(self.spec.num_layers, batch, capacity, self.spec.num_kv_heads,
                     self.spec.head_dim, self.dtype)
        start_b = jnp.zeros((batch,), jnp.int32) if start_b is None else start_b
        return DecodeState(cache, jnp.zeros((), jnp.int32), jnp.asarray(start_b, jnp.int32))

    def decode(self, tokens_bkt: jax.Array, state: DecodeState, layers: tuple | None = None,
               features: Features = None) -> tuple[jax.Array, list[jax.Array], DecodeState]:
        """Feed T new steps (a prompt, or one step) through the cache; a prompt may carry
        speech `features` (see `embed_inputs`), a sampled step never does.

        Returns the temporal output `[B, T, D]` (for the depth decoder), per-stream logits, and
        the advanced state. `layers` (`self.decoder.split_layers()`, with a per-layer state)
        decodes on per-layer weights; see `DecoderStack.__call__`.
        """
        t = tokens_bkt.shape[2]
        # positions count from each row's first real slot, as they would without the padding
        positions_bt = state.index + jnp.arange(t)[None, :] - state.start[:, None]
        h_btd, cache = self.decoder(self.embed_inputs(tokens_bkt, features), positions_bt,
                                    state.cache, state.index, layers=layers, start_b=state.start)
        logits = self.heads(h_btd, self.embed.table[...])
        return h_btd, logits, DecodeState(cache, state.index + t, state.start)


def segment_positions(segments_bt: jax.Array) -> jax.Array:
    """Each position's offset from the start of its segment (a run of equal ids)."""
    t = jnp.arange(segments_bt.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segments_bt[:, :1], bool),
                              segments_bt[:, 1:] != segments_bt[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array,
                   spans: Spans) -> tuple[jax.Array, jax.Array]:
    """Log-probabilities of flat-id targets under a head's logits (targets mapped into its
    local index space), and whether each target is in the head's spans at all."""
    local_bt = to_local(targets_bt, spans)
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    logp_bt = jnp.take_along_axis(logp_btv, jnp.maximum(local_bt, 0)[..., None], axis=-1)[..., 0]
    return logp_bt, local_bt >= 0


def _xent(logits_btv: jax.Array, targets_bt: jax.Array, spans: Spans,
          weights_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted cross-entropy sum over targets mapped into the head's local index space."""
    logp_bt, valid_bt = token_logprobs(logits_btv, targets_bt, spans)
    nll_bt = -logp_bt
    w_bt = jnp.where(valid_bt, weights_bt, 0.0)
    invalid = jnp.sum((~valid_bt) & (weights_bt > 0))
    return jnp.sum(nll_bt * w_bt), jnp.sum(w_bt), invalid
