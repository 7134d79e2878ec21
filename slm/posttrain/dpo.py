"""DPO: prefer the better of two replies relative to a frozen reference (Rafailov et al.,
arXiv 2305.18290), L = -log sigmoid(beta [(log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))]).

Pairs are two of the student's own rollouts per question, ranked by the rule reward
(`posttrain.reward`, by default the closed world's answer check); a pair whose replies scored
alike says nothing and is dropped (weight 0, counted as a tie), so every step keeps one shape
and compiles once. Offline pairs come from a JSONL file (`posttrain.dpo.pairs`), one object a
line, as token grids in the run's flat ids (`K` rows each):
`{"prompt": [[...], ...], "chosen": [[...], ...], "rejected": [[...], ...]}`; every reply token
inside its stream's vocabulary counts, as there is no sampler to say which were drawn.

tunix's `DPOTrainer` (google/tunix, tunix/sft/dpo) was read and its loss is the formula used
here; its trainer is not: it takes `[B, T]` prompt/completion token rows with masks from a
pad id and runs them through a `model(tokens, positions, cache, mask)` LM, while an slm reply
is a `[K, S]` multi-stream grid with user speech frames, whose drawn tokens only slm's
sampler knows; its pairs are given, never sampled and ranked on the fly; and it checkpoints
through its own manager, not the orbax state `slm train` resumes exactly. (The package also
pins transformers 5.12.1, below slm's 5.24.)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from slm.errors import DataError
from slm.model import to_local
from slm.posttrain.method import MethodSetup, register_method
from slm.posttrain.prompts import Prompt, keyed_order
from slm.posttrain.rollout import model_inputs, sequence_logprobs
from slm.sample import left_pad
from slm.types import StreamSpec


def dpo_losses(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
               ref_rejected: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
    """Per-pair losses and implicit reward margins from sequence log-probs."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -jax.nn.log_sigmoid(margin), margin


def rank_pairs(rewards_n2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices (into the 2N rollouts) of each pair's chosen and rejected reply, and the
    pair's weight: 0 for a tie, which no preference can be learned from."""
    first_better = rewards_n2[:, 0] > rewards_n2[:, 1]
    rows = np.arange(len(rewards_n2)) * 2
    chosen = np.where(first_better, rows, rows + 1)
    rejected = np.where(first_better, rows + 1, rows)
    return chosen, rejected, (rewards_n2[:, 0] != rewards_n2[:, 1]).astype(np.float32)


class DirectPreference:
    """`slm posttrain dpo`: pairs from rollouts, or from `posttrain.dpo.pairs`."""

    def __init__(self, setup: MethodSetup):
        config = setup.config
        self.beta = config.posttrain.dpo.beta
        self.rollout, self.reference = setup.rollout, setup.reference
        self.replies_per_step = 2 * config.posttrain.prompts
        self.offline = (OfflinePairs(config.posttrain.dpo.pairs, setup.streams, self.rollout.steps,
                                     config.seed, config.posttrain.prompts)
                        if config.posttrain.dpo.pairs else None)
        # offline pairs ask nothing: no questions are read and nothing is scored
        self.prompts = setup.prompts if self.offline is None else None
        self.scorer = setup.scorer if self.offline is None else None

    def batch(self, params, step: int, key: jax.Array) -> tuple[dict, dict]:
        if self.offline is not None:
            pairs, host = self.offline.batch(step), {}
        else:
            pairs, host = self._rolled_pairs(params, self.prompts.batch(step), key)
        for side in ("chosen/", "rejected/"):
            logp = self.rollout.logprobs(self.reference, *model_inputs(pairs, side))
            pairs[side + "ref"] = sequence_logprobs(logp, pairs[side + "mask"])
        return pairs, host

    def _rolled_pairs(self, params, prompts: list[Prompt], key) -> tuple[dict, dict]:
        grids = [p.grid for p in prompts for _ in range(2)]
        rolled = self.rollout(params, grids, key, logprobs=False)
        scores = self.scorer(grids, rolled.replies(), [p.qa for p in prompts for _ in range(2)])
        chosen, rejected, weight = rank_pairs(scores.rewards.reshape(-1, 2))
        rows = rolled.inputs() | {"mask": rolled.mask}
        pairs = {f"chosen/{k}": v[chosen] for k, v in rows.items()}
        pairs |= {f"rejected/{k}": v[rejected] for k, v in rows.items()}
        pairs["weight"] = jnp.asarray(weight)
        host = scores.summary(rolled.length) | {"ties": float(len(weight) - weight.sum())}
        return pairs, host

    def objective(self, model, batch: dict, key: jax.Array | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, dict]]:
        chosen, rejected = model_inputs(batch, "chosen/"), model_inputs(batch, "rejected/")
        both = [jnp.concatenate([c, r]) for c, r in zip(chosen[:2], rejected[:2])]
        features = None if chosen[2] is None else tuple(
            jnp.concatenate([c, r]) for c, r in zip(chosen[2], rejected[2]))
        logp = model.token_logprobs(*both, features)
        mask = jnp.concatenate([batch["chosen/mask"], batch["rejected/mask"]])
        policy_c, policy_r = jnp.split(sequence_logprobs(logp, mask), 2)
        losses, margin = dpo_losses(policy_c, policy_r, batch["chosen/ref"],
                                    batch["rejected/ref"], self.beta)
        w = batch["weight"]
        metrics = {"loss_sum/dpo": jnp.sum(losses * w), "weight_sum/dpo": jnp.sum(w),
                   "stat_sum/margin": jnp.sum(margin * w), "stat_weight/margin": jnp.sum(w),
                   "stat_sum/pair_accuracy": jnp.sum((margin > 0) * w),
                   "stat_weight/pair_accuracy": jnp.sum(w)}
        return jnp.sum(losses * w), (jnp.sum(w), metrics)


class OfflinePairs:
    """Pairs read from JSONL, `per_step` a step in a seeded order per epoch."""

    def __init__(self, path: str, streams: tuple[StreamSpec, ...], reply_steps: int, seed: int,
                 per_step: int):
        lines = [line for line in Path(path).read_text("utf-8").splitlines() if line.strip()] \
            if Path(path).is_file() else None
        if not lines:
            raise DataError(f"posttrain.dpo.pairs={path}: no such file or no pairs in it")
        self.pairs = [self._parse(line, f"{path}:{i + 1}", len(streams), reply_steps)
                      for i, line in enumerate(lines)]
        self.streams, self.steps, self.seed, self.per_step = streams, reply_steps, seed, per_step

    @staticmethod
    def _parse(line: str, where: str, k: int, reply_steps: int) -> dict[str, np.ndarray]:
        try:
            pair = {key: np.asarray(json.loads(line)[key], np.int32)
                    for key in ("prompt", "chosen", "rejected")}
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{where}: not a pair of token grids ({err}); each line needs "
                            '"prompt", "chosen" and "rejected", each K lists of flat ids') from None
        for key, grid in pair.items():
            if grid.ndim != 2 or grid.shape[0] != k or grid.shape[1] < 1:
                raise DataError(f"{where}: {key!r} has shape {grid.shape}; the model reads "
                                f"{k} streams, so each grid must be [{k}, steps]")
        longest = max(pair["chosen"].shape[1], pair["rejected"].shape[1])
        if longest > reply_steps:
            raise DataError(f"{where}: a reply of {longest} steps; raise "
                            f"posttrain.rollout.max_steps (now {reply_steps}) to at least that")
        return pair

    def batch(self, step: int) -> dict[str, jax.Array]:
        picked = [self.pairs[i] for i in keyed_order(self.seed, len(self.pairs), step,
                                                      self.per_step)]
        prompt_bkt, start_b = left_pad([pair["prompt"] for pair in picked])
        out = {"weight": jnp.ones(len(picked), jnp.float32)}
        for side in ("chosen", "rejected"):
            reply_bks = np.full((len(picked), prompt_bkt.shape[1], self.steps), -1, np.int32)
            for b, pair in enumerate(picked):
                reply_bks[b, :, :pair[side].shape[1]] = pair[side]
            tokens = jnp.asarray(np.concatenate([prompt_bkt, reply_bks], axis=2))
            width = tokens.shape[2]
            drawn = jnp.stack([to_local(tokens[:, k, 1:], s.spans) >= 0
                               for k, s in enumerate(self.streams)], axis=1)
            in_reply = jnp.arange(1, width) >= prompt_bkt.shape[2]
            out[f"{side}/tokens"] = tokens
            out[f"{side}/segments"] = jnp.asarray(np.arange(width)[None] >= start_b[:, None],
                                                  jnp.int32)
            out[f"{side}/mask"] = (drawn & in_reply).astype(jnp.float32)
        return out


register_method("dpo", DirectPreference,
                "DPO on pairs of rollouts ranked by the rule reward (or offline pairs)")
