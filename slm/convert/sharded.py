"""Read an HF checkpoint straight into the mesh, one device shard at a time.

Every parameter's reader slices one device's region out of the memory-mapped file (through the
layout views of slm.convert.layout) and converts only it (`slm.convert.shard_reader`). Parameters the LLM does not have (a depth decoder)
are initialised in their shards by a jitted init that returns only them.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx, traverse_util

from slm.config import Config
from slm.convert.expand import RowStats, head_ids, mapped_rows
from slm.convert.hf_config import HFModel
from slm.convert.layout import EMBED, FINAL_NORM, LM_HEAD, layer_tensors
from slm.convert.shard_reader import LoadStats, Reader, device_bytes, read_sharded
from slm.convert.tensors import TensorFiles
from slm.errors import CheckpointError
from slm.model import SpeechLM
from slm.train.state import StatePlan
from slm.types import build_streams
from slm.vocab import Vocab


class _Readers:
    """Builds the per-parameter shard readers for one checkpoint and vocabulary."""

    def __init__(self, config: Config, vocab: Vocab, hf: HFModel, files: TensorFiles):
        m = config.model
        self.vocab, self.seed = vocab, config.seed
        self.embed = files.get(EMBED, (hf.vocab_size, m.d_model))
        self.head = None if m.tie_embeddings else files.get(LM_HEAD, (hf.vocab_size, m.d_model))
        self.streams = build_streams(m, vocab)
        self.files, self.layers = files, {t.path: t for t in layer_tensors(m)}
        self.num_layers = m.num_layers
        self._stats: dict[str, RowStats] = {}

    def stats(self, table: str) -> RowStats:
        if table not in self._stats:
            self._stats[table] = RowStats.measure(self.embed if table == "embed" else self.head)
        return self._stats[table]

    def reader(self, path: tuple[str, ...]) -> Reader | None:
        """How to read one parameter's shards; None for parameters the LLM does not have."""
        if path == ("embed", "table"):
            return lambda idx: mapped_rows(self.embed, np.arange(idx[0].start, idx[0].stop),
                                           idx[1], self.vocab, self.stats("embed"), self.seed,
                                           "embed")
        if path == ("embed", "stream"):  # zero: a single text stream then adds nothing
            return lambda idx: np.zeros([s.stop - s.start for s in idx], np.float32)
        if path == ("heads", "w"):
            ids = head_ids(self.streams)
            return lambda idx: mapped_rows(self.head, ids[idx[1]], idx[0], self.vocab,
                                           self.stats("head"), self.seed, "head").T
        if path == ("decoder", "final_norm", "scale"):
            norm = self.files.get(FINAL_NORM, (self.embed.shape[1],))
            return lambda idx: norm[idx[0]]
        if path[:2] == ("decoder", "layers"):
            if path[2:] not in self.layers:
                raise CheckpointError(f"slm parameter {'.'.join(path)} has no HF counterpart")
            t = self.layers[path[2:]]
            views = [t.to_slm(self.files.get(t.hf_name(i), t.hf_shape))
                     for i in range(self.num_layers)]
            return lambda idx: np.stack([views[i][tuple(idx[1:])]
                                         for i in range(idx[0].start, idx[0].stop)])
        return None


def load_params(config: Config, vocab: Vocab, hf: HFModel, files: TensorFiles, plan: StatePlan,
                progress: Callable = lambda items: items) -> tuple[dict, LoadStats]:
    """Parameters of `plan` on its mesh, pretrained where the LLM has them."""
    readers = _Readers(config, vocab, hf, files)
    shapes = traverse_util.flatten_dict(plan.param_shapes)
    shardings = traverse_util.flatten_dict(plan.param_shardings)
    found = {path: readers.reader(path) for path in sorted(shapes)}
    flat, largest = read_sharded({p: r for p, r in found.items() if r is not None}, shapes,
                                 shardings, progress)
    fresh = [path for path, read in found.items() if read is None]
    if fresh:
        flat.update(_init_fresh(config, vocab, fresh, {p: shardings[p] for p in fresh}))
    params = traverse_util.unflatten_dict(flat)
    per_device = device_bytes(params)
    total = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in shapes.values())
    return params, LoadStats(total, per_device, largest)


def _init_fresh(config: Config, vocab: Vocab, paths: list[tuple], shardings: dict) -> dict:
    """Fresh values for `paths` only, created in their shards (XLA drops the rest of the init)."""

    def create(key):
        state = nnx.to_pure_dict(nnx.state(SpeechLM(config.model, vocab, nnx.Rngs(params=key))))
        flat = traverse_util.flatten_dict(state)
        return {p: flat[p] for p in paths}

    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    return jax.jit(create, out_shardings=shardings)(key)
