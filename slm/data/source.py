"""The token-source protocol the trainer reads, and the registry of sources by config name."""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from slm.config import Config
from slm.errors import ConfigError
from slm.vocab import Vocab


class TokenSource(Protocol):
    """Yields this host's rows of each global batch: {"tokens": int32, "weights": float32},
    both `[B_host, K, T]`; a source that packs several examples into a row adds "segments":
    int32 `[B_host, 1, T]`, the example each position belongs to (1, 2, ... along the row;
    0 for padding). Its state is JSON-able and saved with every checkpoint (as grain's
    iterators), so a resumed run reads exactly the batches the uninterrupted one would have."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def make_source(config: Config, vocab: Vocab, process_index: int = 0,
                process_count: int = 1) -> TokenSource:
    """The source named by `data.source`, reading this host's share of every batch."""
    from slm.data.synthetic import SyntheticTokens

    sources = {"synthetic": SyntheticTokens, "records": records_source}
    if config.data.source not in sources:
        raise ConfigError(
            f"data.source={config.data.source!r} is unknown; choose one of {sorted(sources)}"
        )
    if config.data.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} must divide evenly over {process_count} hosts"
        )
    return sources[config.data.source](config, vocab, process_index, process_count)


def records_source(config: Config, vocab: Vocab, process_index: int, process_count: int):
    """Tokenized shards laid out by the configured strategy, mixed by task weight."""
    from slm.data.examples import split_for, task
    from slm.data.pipeline import GrainTokenSource
    from slm.strategies import make_strategy

    data, parts = config.data, []
    if not data.dir:
        raise ConfigError("data.source=records needs data.dir (the output of `slm tokenize`)")
    for name, weight in data.mixture.items():
        _, segments_of = task(name)
        if weight <= 0:  # weight 0 switches a task off, e.g. in one run of an ablation
            continue
        strategy = make_strategy(config.strategy, vocab, data_task=name)
        dedup = config.strategy.dedup_input_units and not strategy.frame_aligned

        def layout(record, rng, segments_of=segments_of, strategy=strategy):
            return strategy.layout(segments_of(record, vocab, rng, dedup), vocab).as_batch()

        parts.append((split_for(name, data.split), layout, weight))
    return GrainTokenSource(data.dir, parts, seed=config.seed, seq_len=data.seq_len,
                            batch_size=data.batch_size // process_count,
                            process_index=process_index, process_count=process_count)
