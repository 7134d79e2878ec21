"""Train-step throughput: tokens/s, MFU against the machine's measured matmul peak (the best of
JAX, torch and numpy), and the transformers + torch peer on the same architecture and batch.

slm, the peer and the matmul peak are timed in alternating rounds in one process and each keeps
its best round, so a neighbour that loads the machine for a while slows one round of each side
rather than all of one side.
"""

from __future__ import annotations

import jax
import numpy as np

from slm.bench import hf_peer
from slm.bench.machine import best_seconds, machine_info, matmul_peaks, vendor_peak_flops
from slm.config import Config, ModelConfig
from slm.memory import keep_freed_memory
from slm.model.precision import compute_dtype
from slm.train.trainer import Trainer
from slm.types import build_streams

FLOP_ACCOUNTING = (
    "train FLOPs/token = 6 * N_matmul + 6 * L * T * H * h, where N_matmul counts every weight "
    "multiplied once per token (attention q/k/v/o, MLP, output head; embedding lookups not "
    "counted) and causal attention is counted half: QK^T and AV over T/2 keys on average, "
    "2 FLOPs per multiply-add, backward twice the forward")


def matmul_params(model: ModelConfig, head_size: int) -> int:
    """Weights each token is multiplied by in the temporal decoder and its heads."""
    h = model.head_dim or model.d_model // model.num_heads
    d, f = model.d_model, model.mlp_dim
    per_layer = 2 * d * model.num_heads * h + 2 * d * model.num_kv_heads * h + 3 * d * f
    return model.num_layers * per_layer + d * head_size


def depth_params(model: ModelConfig, codebook_size: int, depth_streams: int) -> int:
    """Weights each frame is multiplied by in the depth decoder (every step's own weights)."""
    dc = model.depth
    if not depth_streams:
        return 0
    per_layer = 4 * dc.d_model * dc.d_model + 3 * dc.d_model * dc.mlp_dim
    per_step = model.d_model * dc.d_model + dc.num_layers * per_layer + dc.d_model * codebook_size
    return depth_streams * per_step


def train_flops_per_token(model: ModelConfig, head_size: int, seq_len: int,
                          depth: int = 0) -> float:
    h = model.head_dim or model.d_model // model.num_heads
    attention = 6 * model.num_layers * seq_len * model.num_heads * h
    return 6 * (matmul_params(model, head_size) + depth) + attention


def bench_train(config: Config, steps: int = 3, rounds: int = 3, vs_hf: bool = False) -> dict:
    """Throughput of the fastest train step of `rounds` x `steps` (data prepared beforehand)."""
    keep_freed_memory()
    machine = machine_info()
    trainer = Trainer(config, progress=False)
    model, vocab = trainer.config.model, trainer.vocab
    dtype = compute_dtype(model.dtype)
    streams = build_streams(model, vocab)
    head = sum(s.size for s in streams if s.head == "temporal")
    depth = [s for s in streams if s.head == "depth"]
    d = config.data
    flops_per_step = d.batch_size * d.seq_len * train_flops_per_token(
        model, head, d.seq_len, depth_params(model, depth[0].size if depth else 0, len(depth)))
    host_batch = next(trainer.source)
    batch = trainer._device_batch(host_batch)
    state = trainer.initial_state()
    holder = {"state": state}

    def slm_step():
        holder["state"], metrics = trainer.step_fn(holder["state"], batch)
        return metrics

    best_seconds(slm_step, 2)  # compile and warm up
    peer_step = None
    if vs_hf:
        peer_step = hf_peer.train_step_fn(trainer.config, vocab, host_batch["tokens"][:, 0])
        peer_step()
    best = {"slm": np.inf, "peer": (np.inf, None), "peaks": {}}
    for _ in range(rounds):
        best["slm"] = min(best["slm"], best_seconds(slm_step, steps))
        if peer_step:
            best["peer"] = min(best["peer"], hf_peer.best_seconds_over_threads(peer_step, steps))
        for library, rate in matmul_peaks(dtype).items():
            best["peaks"][library] = max(best["peaks"].get(library, 0.0), rate)
    best["peak"] = max(best["peaks"].values())
    tokens = int(np.prod(host_batch["tokens"].shape))
    rate = tokens / best["slm"]
    peer_seconds, peer_threads = best["peer"]
    peer_rate = tokens / peer_seconds if peer_step else None
    vendor = vendor_peak_flops(machine["device"])
    return {
        "benchmark": "train", "tokens_per_s": rate,
        "peer": "transformers + torch (CPU), same architecture and batch" if vs_hf else None,
        "peer_tokens_per_s": peer_rate, "ratio_vs_peer": rate / peer_rate if peer_rate else None,
        "mfu": flops_per_step / best["slm"] / best["peak"], "matmul_peak_flops": best["peak"],
        "matmul_peaks": best["peaks"], "vendor_peak_flops": vendor,
        "mfu_vs_vendor": flops_per_step / best["slm"] / vendor if vendor else None,
        "flops_per_step": flops_per_step, "step_seconds": best["slm"],
        "peer_step_seconds": peer_seconds if peer_step else None, "peer_threads": peer_threads,
        "flop_accounting": FLOP_ACCOUNTING, "batch": list(host_batch["tokens"].shape),
        "dtype": dtype,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainer.plan.param_shapes))),
        "rounds": rounds, "steps_per_round": steps, "machine": machine,
    }

