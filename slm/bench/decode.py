"""Decode throughput of the slm sampler on a text-only model: tokens/s at a batch size, the
fraction of the memory-bandwidth roofline it reaches, post-training's rollout of the same
replies (the sampler plus its log-prob pass, `slm.bench.rollout`), and transformers'
`generate()` on the same architecture, batch, prompt and number of new tokens.

Both sides generate exactly `new_tokens` greedy tokens per row: the peer with
`min_new_tokens`, slm with a policy that has no final phase. Timings alternate between the two
sides, round by round, and each side keeps its best round.

The roofline fraction pairs each round's decode with a bandwidth measured right after it and
takes the median over rounds. On a shared machine the memory bandwidth swings with other
tenants' traffic (35-57 GB/s within a minute on the 2-core machine these numbers were taken
on), so the best decode and the best bandwidth of a run rarely come from the same moment;
their ratio is reported too, as `roofline_fraction_best`.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from slm.bench import hf_peer
from slm.bench.machine import machine_info, memory_bandwidth
from slm.bench.rollout import rollout_seconds
from slm.bench.strategies import bench_strategies
from slm.config import Config, RolloutConfig
from slm.memory import keep_freed_memory
from slm.model import SpeechLM
from slm.model.precision import compute_dtype
from slm.posttrain.rollout import Rollout
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.train.trainer import vocab_from_config
from slm.types import Grid
from slm.vocab import Vocab


def endless_text_policy(model: SpeechLM) -> DecodePolicy:
    """Every id of the one stream allowed, no final phase: replies run `steps` steps."""
    (stream,) = model.streams
    ids = np.concatenate([np.arange(a, b) for a, b in stream.spans])
    return DecodePolicy((RuleBuilder(stream).phase("any", ids).build("any", fill=int(ids[0])),))


def bytes_per_step(model: SpeechLM, batch: int, context: float) -> float:
    """Bytes a decode step must read: every weight once (an untied embedding table only for the
    rows looked up) plus each row's live keys and values over `context` positions."""
    _, params = nnx.split(model)
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    table = model.embed.table[...]
    if not model.heads.tied:
        weights -= table.nbytes - batch * table.nbytes // table.shape[0]
    spec = model.spec
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * model.dtype.itemsize
    return weights + batch * kv * context


def bench_decode(config: Config, vocab: Vocab, batch: int, prompt_len: int = 32,
                 new_tokens: int = 128, rounds: int = 3, vs_hf: bool = False) -> dict:
    model = SpeechLM(config.model, vocab, nnx.Rngs(config.seed))
    # post-training's rollout of the same replies; its sampler (greedy) is the one timed alone
    rollout = Rollout(model, endless_text_policy(model), vocab,
                      RolloutConfig(max_steps=new_tokens, temperature=0.0))
    sampler = rollout.sampler
    text = vocab.range("text")
    prompt = np.random.default_rng(config.seed).integers(text.start, text.stop,
                                                         (batch, 1, prompt_len), np.int32)
    grids = [Grid(row, np.ones(row.shape, np.float32)) for row in prompt]
    key = jax.random.key(config.seed)
    timed = {"prefill": np.inf, "steps": np.inf, "total": np.inf, "peer": (np.inf, None),
             "rollout": np.inf}

    def run_slm() -> float:
        """One reply; keeps the best times and returns this round's step seconds."""
        begin = time.perf_counter()
        loop = jax.block_until_ready(sampler.start(prompt, key, new_tokens))
        prefill = time.perf_counter() - begin
        jax.block_until_ready(sampler.advance(loop, new_tokens))
        total = time.perf_counter() - begin
        timed["prefill"] = min(timed["prefill"], prefill)
        timed["steps"] = min(timed["steps"], total - prefill)
        timed["total"] = min(timed["total"], total)
        return total - prefill

    run_slm()  # compile
    rollout_seconds(rollout, sampler.params, grids, key)
    peer = hf_peer.generate_fn(config, vocab, prompt[:, 0], new_tokens) if vs_hf else None
    if peer:
        peer()
    pairs = []  # (step seconds, bandwidth) of each round, measured back to back
    for _ in range(rounds):
        pairs.append((run_slm(), memory_bandwidth()))
        timed["rollout"] = min(timed["rollout"],
                               rollout_seconds(rollout, sampler.params, grids, key))
        if peer:
            timed["peer"] = min(timed["peer"], hf_peer.best_seconds_over_threads(peer, 1))
    tokens = batch * new_tokens
    step_bytes = bytes_per_step(model, batch, prompt_len + (new_tokens - 1) / 2)
    bandwidth = max(bw for _, bw in pairs)
    roofline = batch * bandwidth / step_bytes
    rate, peer_rate = tokens / timed["total"], tokens / timed["peer"][0] if peer else None
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "tokens_per_s": rate, "peer_tokens_per_s": peer_rate,
        "ratio_vs_peer": rate / peer_rate if peer else None, "peer_threads": timed["peer"][1],
        "prefill_ms": 1e3 * timed["prefill"], "step_ms": 1e3 * timed["steps"] / new_tokens,
        "decode_tokens_per_s": tokens / timed["steps"], "roofline_tokens_per_s": roofline,
        "rollout_tokens_per_s": tokens / timed["rollout"],
        "rollout_vs_decode": timed["total"] / timed["rollout"],
        "roofline_fraction": float(np.median([step_bytes / bw / (steps / new_tokens)
                                              for steps, bw in pairs])),
        "roofline_fraction_best": tokens / timed["steps"] / roofline,
        "bytes_per_step": step_bytes, "memory_bandwidth": bandwidth,
    }


def run_decode_benchmark(config: Config, vocab: Vocab, strategies: Config | None = None,
                         batches: tuple[int, ...] = (1, 16), prompt_len: int = 32,
                         new_tokens: int = 128, rounds: int = 3, vs_hf: bool = False) -> dict:
    """The text-only model at each batch size (the first is the headline), then each strategy's
    time to first audio on `strategies`' small models."""
    keep_freed_memory()
    machine = machine_info()
    runs = {str(b): bench_decode(config, vocab, b, prompt_len, new_tokens, rounds, vs_hf)
            for b in batches}
    head = runs[str(batches[0])]
    result = {"benchmark": "decode", **{k: head[k] for k in (
        "tokens_per_s", "peer_tokens_per_s", "ratio_vs_peer", "roofline_fraction",
        "memory_bandwidth", "rollout_tokens_per_s", "rollout_vs_decode")},
        "batch": batches[0], "dtype": compute_dtype(config.model.dtype),
        "peer": "transformers generate() (CPU), same architecture" if vs_hf else None,
        "batches": runs}
    if strategies is not None:
        result["strategies"] = bench_strategies(strategies, vocab_from_config(strategies),
                                                rounds=rounds)
    return {**result, "machine": machine}
