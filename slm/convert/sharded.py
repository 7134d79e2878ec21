"""Read an HF checkpoint straight into the mesh, one device shard at a time.

Every parameter is built with `jax.make_array_from_callback` against its target sharding: the
callback receives one device's index, slices exactly that region out of the memory-mapped
file (through the layout views of slm.convert.layout) and converts only it. No host ever holds
a whole parameter of the sharded model, let alone the whole model; the largest host buffer is
recorded so tests and the CLI can show it. Parameters the LLM does not have (a depth decoder)
are initialised in their shards by a jitted init that returns only them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx, traverse_util

from slm.config import Config
from slm.convert.expand import RowStats, head_ids, mapped_rows
from slm.convert.hf_config import HFModel
from slm.convert.layout import EMBED, FINAL_NORM, LM_HEAD, layer_tensors
from slm.convert.tensors import TensorFiles
from slm.errors import CheckpointError
from slm.model import SpeechLM
from slm.train.state import StatePlan
from slm.types import build_streams
from slm.vocab import Vocab

Reader = Callable[[tuple[slice, ...]], np.ndarray]  # one shard's index -> its values


@dataclasses.dataclass
class LoadStats:
    total_bytes: int  # all parameters, as stored on the mesh
    device_bytes: dict[str, int]  # per device: bytes of the parameter shards it holds
    largest_read_bytes: int  # the largest single host buffer built while loading

    @property
    def max_device_bytes(self) -> int:
        return max(self.device_bytes.values())

    def describe(self) -> str:
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        return (f"parameters {mib(self.total_bytes)} in all; at most "
                f"{mib(self.max_device_bytes)} on one of {len(self.device_bytes)} devices; "
                f"largest host buffer while reading {mib(self.largest_read_bytes)}")


def device_bytes(tree) -> dict[str, int]:
    """Bytes of the shards each device holds, summed over a tree of arrays."""
    per_device: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return per_device


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[slice]:
    return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


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
    largest = 0
    flat, fresh = {}, []
    for path in progress(sorted(shapes)):
        read = readers.reader(path)
        if read is None:
            fresh.append(path)
            continue
        shape, dtype = shapes[path].shape, shapes[path].dtype

        def callback(index, read=read, shape=shape, dtype=dtype):
            nonlocal largest
            values = np.asarray(read(_bounds(index, shape)), dtype)
            largest = max(largest, values.nbytes)
            return values

        flat[path] = jax.make_array_from_callback(shape, shardings[path], callback)
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
