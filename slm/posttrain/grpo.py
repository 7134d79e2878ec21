"""GRPO: G replies per question, rewards normalised within each group, a clipped ratio and a
k3 KL estimate to the frozen reference (DeepSeekMath, arXiv 2402.03300).

tunix's `GRPOLearner` (google/tunix, tunix/rl/grpo) was read and its formulas are the ones
used here (group advantages, `-min(r A, clip(r) A)`, k3 KL, token or sequence
normalisation); its learner is not, for slm's model and sampler:
- it scores a completion as one `[B, T]` token row of a `model(tokens, positions, cache,
  mask)` LM, with the completion's mask derived from an EOS id; an slm reply is a `[K, S]`
  grid whose streams have their own heads, delays and fills, and which tokens the policy
  drew is known only to the sampler's phase machines (`Sampled.sampled`);
- it generates through its own rollout workers (vanilla sampler, vLLM, SGLang) over its
  model wrappers, not through slm's one jitted sampler with per-stream decode policies and
  user speech frames;
- it checkpoints through its own manager, not slm's orbax state (params, optimizer, data
  position) that `slm train` resumes bit for bit;
- the package pins transformers 5.12.1, below the 5.24 slm uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slm.config import Config, GRPOConfig
from slm.errors import ConfigError
from slm.posttrain.method import MethodSetup, register_method
from slm.posttrain.rollout import model_inputs

NORMALIZE = ("token", "sequence")


def group_advantages(rewards_ng: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(r - group mean) / (group std + eps): which replies beat their siblings. A group
    whose replies all scored alike carries no signal and gets advantage 0."""
    mean = rewards_ng.mean(axis=1, keepdims=True)
    return ((rewards_ng - mean) / (rewards_ng.std(axis=1, keepdims=True) + eps)).astype(np.float32)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token KL(policy || reference) estimate exp(d) - d - 1, d = ref - policy: unbiased
    on the policy's own samples and never negative (Schulman's k3)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantage: jax.Array,
                      epsilon: float) -> jax.Array:
    """Per-token PPO loss -min(r A, clip(r, 1-eps, 1+eps) A), r = p / p_old."""
    ratio = jnp.exp(logp - old_logp)
    return -jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * advantage)


def grpo_loss_sum(per_token_bkt: jax.Array, mask_bkt: jax.Array,
                  normalize: str) -> tuple[jax.Array, jax.Array]:
    """(loss sum, weight) under the normalisation: "token" weighs every drawn token alike (long
    replies count more); "sequence" averages within each reply first (every reply counts
    alike, the paper's form)."""
    masked = jnp.where(mask_bkt > 0, per_token_bkt, 0.0)
    if normalize == "token":
        return jnp.sum(masked), jnp.sum(mask_bkt)
    tokens_b = jnp.sum(mask_bkt, axis=(1, 2))
    per_reply_b = jnp.sum(masked, axis=(1, 2)) / jnp.maximum(tokens_b, 1.0)
    return jnp.sum(per_reply_b), jnp.sum(tokens_b > 0).astype(jnp.float32)


class GroupRelative:
    """`slm posttrain grpo`."""

    def __init__(self, setup: MethodSetup):
        self.cfg: GRPOConfig = setup.config.posttrain.grpo
        if self.cfg.normalize not in NORMALIZE:
            raise ConfigError(f"posttrain.grpo.normalize={self.cfg.normalize!r}; choose one of "
                              f"{NORMALIZE}")
        if self.cfg.group < 2 or self.cfg.iterations < 1:
            raise ConfigError(f"posttrain.grpo.group={self.cfg.group} must be >= 2 (advantages "
                              f"compare siblings) and iterations={self.cfg.iterations} >= 1")
        self.rollout, self.reference = setup.rollout, setup.reference
        self.prompts, self.scorer = setup.prompts, setup.scorer
        self.replies_per_step = self.cfg.group * setup.config.posttrain.prompts

    def batch(self, params, step: int, key: jax.Array) -> tuple[dict, dict]:
        prompts = self.prompts.batch(step)
        grids = [p.grid for p in prompts for _ in range(self.cfg.group)]
        rolled = self.rollout(params, grids, key)
        scores = self.scorer(grids, rolled.replies(), [p.qa for p in prompts
                                                       for _ in range(self.cfg.group)])
        advantage = group_advantages(scores.rewards.reshape(len(prompts), self.cfg.group))
        ref = self.rollout.logprobs(self.reference, *model_inputs(rolled.inputs()))
        batch = rolled.inputs() | {"mask": rolled.mask, "old_logp": rolled.logp, "ref_logp": ref,
                                   "advantage": jnp.asarray(advantage.reshape(-1))}
        host = scores.summary(rolled.length)
        return batch, host

    def objective(self, model, batch: dict, key: jax.Array | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, dict]]:
        logp = model.token_logprobs(*model_inputs(batch))
        mask = batch["mask"]
        kl = k3_kl(logp, batch["ref_logp"])
        per_token = clipped_surrogate(logp, batch["old_logp"], batch["advantage"][:, None, None],
                                      self.cfg.epsilon) + self.cfg.kl_beta * kl
        total, weight = grpo_loss_sum(per_token, mask, self.cfg.normalize)
        ratio = jnp.exp(logp - batch["old_logp"])
        clipped = (jnp.abs(ratio - 1.0) > self.cfg.epsilon) & (mask > 0)
        tokens = jnp.sum(mask)
        metrics = {"loss_sum/grpo": total, "weight_sum/grpo": weight,
                   "stat_sum/kl": jnp.sum(jnp.where(mask > 0, kl, 0.0)), "stat_weight/kl": tokens,
                   "stat_sum/clipped": jnp.sum(clipped).astype(jnp.float32),
                   "stat_weight/clipped": tokens}
        return total, (weight, metrics)


def updates_per_step(config: Config) -> int:
    return config.posttrain.grpo.iterations


register_method("grpo", GroupRelative,
                "GRPO: group-normalised rule rewards, clipped ratio, KL to the reference",
                updates=updates_per_step)
