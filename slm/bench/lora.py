"""Full fine-tuning vs LoRA on one model: trained parameters, optimizer-state bytes, step time.

The LoRA side adds adapters to the same model and trains them alone (`train.trainable:
[lora]`): its optimizer state covers the adapters only, and its step computes no weight
gradient for the frozen matrices. Both sides train on the same batch; steps are timed in
alternating rounds and each side keeps its best, so a neighbour loading the machine for a
while slows one round of each rather than all of one side.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from slm.bench.machine import best_seconds, machine_info
from slm.config import Config, LoraConfig
from slm.memory import keep_freed_memory
from slm.model.lora import PROJECTIONS
from slm.train.trainer import Trainer


def _side(config: Config) -> dict:
    """A trainer on `config` with its step ready to time, and what it holds."""
    trainer = Trainer(config, progress=False)
    batch = trainer._device_batch(next(trainer.source))
    holder = {"state": trainer.initial_state()}

    def step():
        holder["state"], metrics = trainer.step_fn(holder["state"], batch)
        return metrics

    best_seconds(step, 2)  # compile and warm up
    state, plan = holder["state"], trainer.plan
    trained, _ = plan.trainable.split(plan.param_shapes)
    # XLA's count, machine-independent; a scanned layer stack's body counts once
    flops = trainer.step_fn.lower(state, batch).cost_analysis()["flops"]
    return {"step": step, "step_flops": float(flops),
            "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(plan.param_shapes))),
            "trained_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trained))),
            "optimizer_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))}


def bench_lora(config: Config, rank: int = 8, targets: tuple[str, ...] = PROJECTIONS,
               steps: int = 3, rounds: int = 3) -> dict:
    """Full fine-tuning of `config`'s model vs rank-`rank` adapters on `targets` over it."""
    keep_freed_memory()
    machine = machine_info()
    full_config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                        trainable=["all"]))
    lora = LoraConfig(rank=rank, alpha=2.0 * rank, targets=list(targets))
    lora_config = dataclasses.replace(
        full_config, model=dataclasses.replace(config.model, lora=lora),
        train=dataclasses.replace(config.train, trainable=["lora"]))
    sides = {"full": _side(full_config), "lora": _side(lora_config)}
    best = {name: np.inf for name in sides}
    for _ in range(rounds):
        for name, side in sides.items():
            best[name] = min(best[name], best_seconds(side["step"], steps))
    result = {"benchmark": "lora", "adapters": dataclasses.asdict(lora),
              "batch": [config.data.batch_size, len(config.model.streams), config.data.seq_len],
              "rounds": rounds, "steps_per_round": steps, "machine": machine}
    for name, side in sides.items():
        result[name] = {k: v for k, v in side.items() if k != "step"} | {"step_seconds": best[name]}
    result["optimizer_bytes_ratio"] = result["lora"]["optimizer_bytes"] / result["full"]["optimizer_bytes"]
    result["trained_fraction"] = result["lora"]["trained_params"] / result["lora"]["params"]
    result["step_speedup"] = best["full"] / best["lora"]
    result["flops_ratio"] = result["lora"]["step_flops"] / result["full"]["step_flops"]
    return result
