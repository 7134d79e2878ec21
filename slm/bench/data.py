"""Is the input pipeline fast enough? Tokens/s it delivers vs tokens/s the train step eats.

Both are measured in the same run on the same config; the pipeline should be at least 10x
ahead so training never waits for data.
"""

from __future__ import annotations

import time

import jax

from slm.bench.machine import best_seconds
from slm.config import Config
from slm.data.source import make_source
from slm.train.trainer import Trainer, vocab_from_config


def _grid_tokens(batch: dict) -> int:
    return int(batch["tokens"].size)


def pipeline_tokens_per_s(config: Config, seconds: float = 5.0, warmup: int = 3) -> float:
    """Grid tokens per second out of `make_source` (host side, one process)."""
    source = make_source(config, vocab_from_config(config))
    for _ in range(warmup):
        next(source)
    tokens, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        tokens += _grid_tokens(next(source))
    return tokens / (time.perf_counter() - begin)


def train_tokens_per_s(config: Config, steps: int = 10, warmup: int = 2) -> float:
    """Grid tokens per second through the jitted train step (data prepared beforehand), at its
    fastest of `steps` steps: the most the pipeline could ever have to deliver."""
    trainer = Trainer(config, progress=False)
    holder = {"state": trainer.initial_state()}
    batch = trainer._device_batch(next(trainer.source))

    def step():
        holder["state"], metrics = trainer.step_fn(holder["state"], batch)
        return metrics

    best_seconds(step, warmup)  # compile and warm up
    return _grid_tokens(batch) / best_seconds(step, steps)


def bench_data(config: Config, seconds: float = 5.0, steps: int = 10) -> dict:
    data = pipeline_tokens_per_s(config, seconds)
    train = train_tokens_per_s(config, steps)
    return {"benchmark": "data", "tokens_per_s": data, "peer": "train step consumption",
            "peer_tokens_per_s": train, "ratio_vs_peer": data / train,
            "batch": [config.data.batch_size, len(config.model.streams), config.data.seq_len],
            "source": config.data.source, "strategy": config.strategy.name,
            "devices": jax.device_count(), "backend": jax.default_backend()}
