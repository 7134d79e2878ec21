"""Rollout throughput beside plain decoding: what post-training's sampling costs over the
sampler alone, on the same model, prompts, key and batch.

A rollout (`slm.posttrain.rollout.Rollout`) is the sampler's reply plus what post-training
needs of it: the prompt grid joined to the reply, the mask of drawn tokens and one
teacher-forced pass for the log-probs. Both sides count the same tokens (rows x streams x the
reply steps the loop ran; the same key draws the same replies) and include the prefill, as
`slm bench decode`'s tokens/s does. Rounds alternate between the two sides, and each side
keeps its best round.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax

from slm.posttrain.rollout import Rollout
from slm.types import Grid


def rollout_seconds(rollout: Rollout, params, prompts: Sequence[Grid], key: jax.Array) -> float:
    """Wall seconds of one rollout with its log-probs, until every array is ready."""
    begin = time.perf_counter()
    jax.block_until_ready(rollout(params, prompts, key))
    return time.perf_counter() - begin


def decode_seconds(rollout: Rollout, params, prompts: Sequence[Grid],
                   key: jax.Array) -> tuple[float, int]:
    """Wall seconds of the rollout's sampler alone on the same prompts, and the reply steps
    its loop ran."""
    rollout.sampler.params = params
    begin = time.perf_counter()
    sampled = jax.block_until_ready(rollout.sampler(prompts, key, rollout.steps))
    return time.perf_counter() - begin, int(jax.device_get(sampled.length).max())


def bench_rollout(rollout: Rollout, params, prompts: Sequence[Grid], key: jax.Array,
                  rounds: int = 3) -> dict:
    """Rollout and plain decode tokens/s of `prompts` (one batch), best of `rounds` each
    after a first, compiling round of both."""
    rollout_seconds(rollout, params, prompts, key)
    _, steps = decode_seconds(rollout, params, prompts, key)
    best_rollout = best_decode = float("inf")
    for _ in range(rounds):
        best_decode = min(best_decode, decode_seconds(rollout, params, prompts, key)[0])
        best_rollout = min(best_rollout, rollout_seconds(rollout, params, prompts, key))
    tokens = len(prompts) * len(rollout.sampler.streams) * steps
    return {"batch": len(prompts), "streams": len(rollout.sampler.streams), "reply_steps": steps,
            "max_steps": rollout.steps, "rounds": rounds,
            "rollout_tokens_per_s": tokens / best_rollout,
            "decode_tokens_per_s": tokens / best_decode,
            "rollout_vs_decode": best_decode / best_rollout}
