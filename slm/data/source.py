"""The token-source protocol the trainer reads, and the registry of sources by config name."""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from slm.config import Config
from slm.errors import ConfigError
from slm.vocab import Vocab


class TokenSource(Protocol):
    """Yields this host's rows of each global batch: {"tokens": int32, "weights": float32},
    both `[B_host, K, T]`. Its state is JSON-able and saved with every checkpoint (as grain's
    iterators), so a resumed run reads exactly the batches the uninterrupted one would have."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def make_source(config: Config, vocab: Vocab, process_index: int = 0,
                process_count: int = 1) -> TokenSource:
    """The source named by `data.source`, reading this host's share of every batch."""
    from slm.data.synthetic import SyntheticTokens  # registry of sources grows here

    sources = {"synthetic": SyntheticTokens}
    if config.data.source not in sources:
        raise ConfigError(
            f"data.source={config.data.source!r} is unknown; choose one of {sorted(sources)}"
        )
    return sources[config.data.source](config, vocab, process_index, process_count)
