"""Rollouts: replies sampled on device from the current weights, with their log-probs.

The sampler (`slm.sample.Sampler`: prefill, then one jitted `lax.while_loop` over a KV cache)
compiles once; each rollout hands it the current parameters (`Sampler.params`), so sampling
from new weights neither recompiles nor returns to the host per token. Log-probs are
recomputed by one teacher-forced forward over prompt + reply (`SpeechLM.token_logprobs`)
rather than kept from sampling: the sampler draws from tempered, top-k/top-p cut,
phase-masked logits, while the losses need the policy's own distribution (temperature 1,
whole head), the one gradients flow through.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from slm.config import RolloutConfig
from slm.model import SpeechLM
from slm.sample import Sampler, StreamSampling, left_pad, left_pad_features
from slm.strategies.policy import DecodePolicy
from slm.types import Grid
from slm.vocab import Vocab


@struct.dataclass
class Rollouts:
    """B prompt + reply grids. Per-token arrays are `[B, K, T-1]`: entry t is about step t+1,
    the token that position t predicts (as `SpeechLM.token_logprobs`)."""

    tokens: jax.Array  # int32 [B, K, T]: left-padded prompt (-1: no input), then the reply
    segments: jax.Array  # int32 [B, T]: 0 on the prompt's left padding, 1 elsewhere
    features: tuple[jax.Array, jax.Array] | None  # the prompts' frames [B, T, W, D] and mask
    mask: jax.Array  # float32 [B, K, T-1]: 1 where the policy drew the token (not a forced fill)
    logp: jax.Array | None  # float32 [B, K, T-1]: each token's log-prob under the rollout weights
    length: jax.Array  # int32 [B]: reply steps until every stream ended
    reply_steps: int = struct.field(pytree_node=False)  # S: the reply is the last S steps

    def replies(self) -> list[np.ndarray]:
        """Each reply grid `[K, length]` on the host, for reading and rewarding."""
        tokens, length = jax.device_get((self.tokens[:, :, -self.reply_steps:], self.length))
        return [tokens[b, :, :length[b]] for b in range(tokens.shape[0])]

    def inputs(self) -> dict[str, jax.Array]:
        """The model's inputs as batch entries (see `model_inputs`)."""
        out = {"tokens": self.tokens, "segments": self.segments}
        if self.features is not None:
            out["features"], out["feature_mask"] = self.features
        return out


def model_inputs(batch: dict, prefix: str = "") -> tuple:
    """(tokens, segments, features) of `batch` entries named `prefix` + those of `inputs`."""
    features = None
    if prefix + "features" in batch:
        features = (batch[prefix + "features"], batch[prefix + "feature_mask"])
    return batch[prefix + "tokens"], batch[prefix + "segments"], features


def sequence_logprobs(logp_bkt: jax.Array, mask_bkt: jax.Array) -> jax.Array:
    """log p(reply) `[B]`: the drawn tokens' log-probs summed over streams and steps."""
    return jnp.sum(jnp.where(mask_bkt > 0, logp_bkt, 0.0), axis=(1, 2))


def _token_logprobs(graphdef, params, tokens, segments, features) -> jax.Array:
    return nnx.merge(graphdef, params).token_logprobs(tokens, segments, features)


class Rollout:
    """Samples replies to prompt grids and scores them teacher-forced.

    Every stream samples with the same `RolloutConfig` settings: what post-training explores
    is the reply as a whole.
    """

    def __init__(self, model: SpeechLM, policy: DecodePolicy, vocab: Vocab, cfg: RolloutConfig):
        how = StreamSampling(cfg.temperature, cfg.top_k, cfg.top_p)
        self.sampler = Sampler(model, policy, vocab, (how,) * len(model.streams), cfg.max_steps)
        self.steps = cfg.max_steps
        self.logprobs = jax.jit(functools.partial(_token_logprobs, self.sampler.graphdef))

    def __call__(self, params, prompts: Sequence[Grid], key: jax.Array,
                 logprobs: bool = True) -> Rollouts:
        """Replies to `prompts` from `params` (plain dicts, as `TrainState.params`), with
        their log-probs unless `logprobs` is False (a method that recomputes them anyway)."""
        self.sampler.params = params
        sampled = self.sampler(prompts, key, self.steps)
        prompt_bkt, start_b = left_pad([g.tokens for g in prompts])
        frames = left_pad_features(prompts, prompt_bkt.shape[2], start_b)
        tokens = jnp.concatenate([jnp.asarray(prompt_bkt), sampled.tokens], axis=2)
        width = tokens.shape[2]
        segments = jnp.asarray(np.arange(width)[None, :] >= start_b[:, None], jnp.int32)
        features = None
        if frames is not None:
            features = tuple(jnp.asarray(np.concatenate(
                [x, np.zeros((x.shape[0], self.steps, *x.shape[2:]), x.dtype)], axis=1))
                for x in frames)
        b, k, p = prompt_bkt.shape
        mask = jnp.concatenate([jnp.zeros((b, k, p - 1), jnp.float32),
                                sampled.sampled.astype(jnp.float32)], axis=2)
        logp = self.logprobs(params, tokens, segments, features) if logprobs else None
        return Rollouts(tokens, segments, features, mask, logp, sampled.length, self.steps)
