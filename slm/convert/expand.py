"""Vocabulary expansion: where each slm row comes from, and how new rows start.

The slm vocabulary (slm.vocab) puts specials first, then the text range, then speech ranges.
An imported LLM's tokenizer *is* the text range, in its own id order, so HF id `i` is slm id
`text.start + i`: a pretrained row moves by a constant offset, stays contiguous, and text
logits in HF id order are the slice `[text.start, text.stop)` of the text head. Every other id
(specials, units, codebooks, the reserved tail) is new.

New rows are drawn around the mean of the pretrained rows with their covariance shrunk by
`NOISE` (Hewitt, "Initializing New Word Embeddings for Pretrained Language Models", 2021): a
new output row then scores about like an average word instead of dominating the softmax, and
a new input row looks like a plausible token. Each row's noise comes from a generator seeded
by (seed, table, id), so every device computes the same values for the rows it holds and the
result does not depend on the mesh.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slm.types import StreamSpec
from slm.vocab import Vocab

NOISE = 1e-5  # covariance scale of new rows (Hewitt 2021)
CHUNK_ROWS = 4096  # rows read at a time when measuring the pretrained rows
SALTS = {"embed": 0, "head": 1}  # new rows of the table and of an untied head draw apart


def hf_rows(flat_ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Pretrained (HF) row of each slm id, or -1 for ids the LLM never had."""
    text = vocab.range("text")
    inside = (flat_ids >= text.start) & (flat_ids < text.stop)
    return np.where(inside, flat_ids - text.start, -1)


def head_ids(streams: tuple[StreamSpec, ...]) -> np.ndarray:
    """The slm id each column of the temporal heads' matrix predicts (streams in order)."""
    return np.concatenate([np.arange(a, b) for s in streams if s.head == "temporal"
                           for a, b in s.spans])


@dataclasses.dataclass(frozen=True)
class RowStats:
    """Mean of the pretrained rows and a square-root factor of their shrunk covariance."""

    mean: np.ndarray  # [D] float64
    factor: np.ndarray  # [D, D]: factor @ factor.T == NOISE * covariance

    @classmethod
    def measure(cls, rows_vd: np.ndarray) -> "RowStats":
        """One pass over `rows_vd` in chunks, so a memory-mapped table is never read whole."""
        n, d = rows_vd.shape
        total, outer = np.zeros(d), np.zeros((d, d))
        for start in range(0, n, CHUNK_ROWS):
            chunk = np.asarray(rows_vd[start:start + CHUNK_ROWS], np.float64)
            total += chunk.sum(0)
            outer += chunk.T @ chunk
        mean = total / n
        cov = outer / n - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh((cov + cov.T) / 2)
        return cls(mean, eigvec * np.sqrt(np.clip(eigval, 0, None) * NOISE))

    def rows(self, ids: np.ndarray, cols: slice, seed: int, table: str) -> np.ndarray:
        """New rows for slm `ids`, columns `cols` only: `[len(ids), cols]` float32."""
        z = np.stack([np.random.default_rng([seed, SALTS[table], int(i)]).standard_normal(
            self.mean.size) for i in ids]) if len(ids) else np.zeros((0, self.mean.size))
        return (self.mean[cols] + z @ self.factor[cols].T).astype(np.float32)


def mapped_rows(source_vd: np.ndarray, ids: np.ndarray, cols: slice, vocab: Vocab,
                stats: RowStats, seed: int, table: str) -> np.ndarray:
    """Rows for slm `ids` (columns `cols`): pretrained rows where the LLM had them, new rows
    elsewhere. Only the pretrained rows asked for are read from `source_vd`."""
    src = hf_rows(ids, vocab)
    old = src >= 0
    out = np.empty((ids.size, len(range(*cols.indices(source_vd.shape[1])))), np.float32)
    if old.any():
        out[old] = source_vd[src[old], cols]
    if (~old).any():
        out[~old] = stats.rows(ids[~old], cols, seed, table)
    return out
