"""Training batches from tokenized shards through grain: shuffle, per-host shard, layout, pack.

grain reads ArrayRecord by index, so the whole pipeline state is a few integers: it goes into
every checkpoint and a resumed run reads exactly the batches the uninterrupted one would have.
Each host owns a disjoint slice of the examples, reshuffled every epoch, and examples are packed first-fit
into fixed `[K, seq_len]` rows so no step compiles twice and little compute goes to padding;
each row's segment ids keep its examples apart in the model (positions, attention, loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from slm.data import records

# (record, per-example rng) -> {"tokens": [K, T], "weights": [K, T]}, and for models that hear
# speech features {"features": [T, W, D], "feature_mask": [T, W]} (slm.types.Grid.as_batch)
Layout = Callable[[dict, np.random.Generator], dict[str, np.ndarray]]
STREAM_MAJOR = ("tokens", "weights")  # [K, T] in a grid, [B, K, T] in a batch


def _time_major(grid: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Packing works along axis 0; examples longer than a row are cut to fit."""
    out = {"tokens": np.ascontiguousarray(grid["tokens"][:, :seq_len].T, dtype=np.int32),
           "weights": np.ascontiguousarray(grid["weights"][:, :seq_len].T, dtype=np.float32)}
    if "features" in grid:
        out["features"] = np.ascontiguousarray(grid["features"][:seq_len], dtype=np.float32)
        out["feature_mask"] = np.ascontiguousarray(grid["feature_mask"][:seq_len], dtype=bool)
    return out


class GrainTokenSource:
    """A `TokenSource` (see slm.data.source) over `slm tokenize` output.

    `parts` is a mixture: `(split, layout, weight)` triples, sampled by weight. A layout gets
    a seeded generator per example (e.g. for interleaving switch points), so the stream of
    batches depends on the seed alone.
    """

    def __init__(self, directory: str | Path, parts: Sequence[tuple[str, Layout, float]], *,
                 seed: int, seq_len: int, batch_size: int, process_index: int = 0,
                 process_count: int = 1, features: bool = False):
        keys = STREAM_MAJOR + (("features", "feature_mask") if features else ())
        datasets = []
        for i, (split, layout, _) in enumerate(parts):
            dataset = grain.MapDataset.source(records.data_source(directory, split))
            dataset = dataset[process_index::process_count].shuffle(seed=seed + i).repeat(None)
            datasets.append(dataset.map(records.decode).random_map(
                lambda r, rng, layout=layout: _time_major(layout(r, rng), seq_len), seed=seed + i))
        mixed = grain.MapDataset.mix(datasets, [w for *_, w in parts]) if len(parts) > 1 else datasets[0]
        packed = grain_exp.FirstFitPackIterDataset(
            mixed.to_iter_dataset(),
            length_struct={key: seq_len for key in keys},
            num_packing_bins=batch_size,
            seed=seed,
        )
        self._iterator = iter(packed.batch(batch_size, drop_remainder=True))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        rows = {key: batch[key] for key in batch if not key.endswith(("_segment_ids", "_positions"))}
        return {**rows, **{key: np.swapaxes(batch[key], 1, 2) for key in STREAM_MAJOR},
                "segments": batch["tokens_segment_ids"][:, None, :].astype(np.int32)}

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)
