"""Train-step time of the two ways a model hears speech features: cached encoder states, or
log-mels through the encoder inside the model (trained with it, or frozen).

Caching is only possible while the encoder never changes; running it in the model is what
training (or adapting) the encoder costs. The variants train the same model on the same
dialogues, differing only in where the user's frames come from; they are timed in alternating
rounds in one process and each keeps its best round, so a busy neighbour slows one round of
each rather than all of one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from slm.bench.machine import best_seconds, machine_info
from slm.config import Config, config_to_dict, load_config
from slm.data.prepare import tokenize_corpus
from slm.demo import prepare
from slm.memory import keep_freed_memory
from slm.train.trainer import Trainer

FEATURES = ["strategy.user_input=features", "tokenizers.cache_features=true"]


def variants(config: Config, out: Path) -> dict[str, Config]:
    """The configs compared, over data prepared under `out` (reused when there)."""
    states = prepare(out, _with(config, *FEATURES, "tokenizers.features=states"))
    log_mel_dir = out / "shards-log_mel"
    tokenize_corpus(out / "corpus", out / "tokenizers", log_mel_dir,
                    config.tokenizers.max_seconds, features="log_mel")
    in_model = _with(states, "tokenizers.features=log_mel", f"data.dir={log_mel_dir}",
                     "model.speech_input.encoder=ctc",
                     f"model.speech_input.encoder_dir={out / 'tokenizers' / 'unit_encoder'}")
    frozen = _with(in_model, "train.trainable=[embeddings, decoder, heads, projector]")
    return {"cached states": states, "encoder in the model, trained": in_model,
            "encoder in the model, frozen": frozen}


def _with(config: Config, *overrides: str) -> Config:
    return load_config(None, list(overrides), patches=[config_to_dict(config)])


def bench_hearing(config: Config, out: str | Path, steps: int = 3, rounds: int = 3) -> dict:
    """Best step seconds per variant, and each one's cost relative to cached states."""
    keep_freed_memory()
    runs = {}
    for name, variant in variants(config, Path(out)).items():
        variant = dataclasses.replace(variant, checkpoint=dataclasses.replace(variant.checkpoint, dir=""))
        trainer = Trainer(variant, progress=False)
        batch = trainer._device_batch(next(trainer.source))
        holder = {"state": trainer.initial_state()}

        def step(trainer=trainer, batch=batch, holder=holder):
            holder["state"], metrics = trainer.step_fn(holder["state"], batch)
            return metrics

        best_seconds(step, 2)  # compile and warm up
        runs[name] = {"step": step, "seconds": np.inf, "batch": list(batch["features"].shape)}
    for _ in range(rounds):
        for run in runs.values():
            run["seconds"] = min(run["seconds"], best_seconds(run["step"], steps))
    base = runs["cached states"]["seconds"]
    return {
        "benchmark": "hearing",
        "variants": {name: {"step_seconds": run["seconds"], "vs_cached": run["seconds"] / base,
                            "features_batch": run["batch"]} for name, run in runs.items()},
        "rounds": rounds, "steps_per_round": steps, "machine": machine_info(),
    }


def summary(result: dict) -> str:
    lines = [f"{'variant':<34} {'step s':>8} {'vs cached':>10}"]
    for name, v in result["variants"].items():
        lines.append(f"{name:<34} {v['step_seconds']:>8.3f} {v['vs_cached']:>9.2f}x")
    return "\n".join(lines)

