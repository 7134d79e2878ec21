"""A learnable synthetic token task, to exercise training before real speech data exists.

Every stream walks through its own vocabulary ranges with a fixed stride from a random start,
so each next token is predictable from the previous one and a working model drives the loss
towards zero. Batch `n` is a pure function of (seed, n): resuming needs no replay, only `n`.
"""

from __future__ import annotations

import numpy as np

from slm.config import Config
from slm.types import build_streams
from slm.vocab import Vocab


class SyntheticTokens:
    def __init__(self, config: Config, vocab: Vocab, process_index: int = 0, process_count: int = 1):
        data = config.data
        self.seed = config.seed
        self.rows = data.batch_size // process_count
        self.first_row = process_index * self.rows
        self.global_batch, self.seq_len = data.batch_size, data.seq_len
        self.ids = [np.concatenate([np.arange(a, b) for a, b in s.spans])
                    for s in build_streams(config.model, vocab)]
        self.strides = [1 + 2 * k for k in range(len(self.ids))]
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, 2**31, size=(self.global_batch, len(self.ids)))
        starts = starts[self.first_row:self.first_row + self.rows]
        t = np.arange(self.seq_len)
        tokens = np.stack(
            [ids[(starts[:, k, None] + stride * t) % len(ids)]
             for k, (ids, stride) in enumerate(zip(self.ids, self.strides))],
            axis=1,
        ).astype(np.int32)
        self.step += 1
        return {"tokens": tokens, "weights": np.ones(tokens.shape, np.float32)}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
