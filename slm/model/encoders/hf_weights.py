"""A transformers speech-encoder directory -> an slm encoder, read one device shard at a time.

`HFConfig` reads `config.json` (and `preprocessor_config.json`, where the feature extractor's
settings live) and names the file and field of every value it refuses. `load_weights` builds the
encoder abstractly, gives each parameter the sharding its logical axis names get on the mesh
(slm.parallel.rules), and fills it with `jax.make_array_from_callback` from memory-mapped
safetensors (slm.convert.tensors): each callback slices and converts only its device's shard,
as slm.convert.sharded does for the LLM. Only safetensors are read: a pickle (`.bin`) could run
code, and the project loads third-party encoders from wherever users point it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from slm.convert.hf_config import read_json_object
from slm.convert.shard_reader import LoadStats, Reader, device_bytes, read_sharded
from slm.convert.tensors import TensorFiles
from slm.errors import CheckpointError, ConfigError
from slm.parallel.rules import tree_shardings

_REQUIRED = object()


class HFConfig:
    """`config.json` and `preprocessor_config.json` (optional) of one model directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = self._read("config.json", required=True)
        self.preprocessor = self._read("preprocessor_config.json", required=False)

    def _read(self, name: str, required: bool) -> dict:
        path = self.dir / name
        if not path.is_file():
            if required:
                raise CheckpointError(f"{path}: no such file; an encoder directory is what "
                                      "transformers' save_pretrained writes (config.json, "
                                      "model.safetensors)")
            return {}
        return read_json_object(path)

    def get(self, field: str, default: Any = _REQUIRED, preprocessor: bool = False) -> Any:
        """A field's value; transformers' default where an older file leaves it out."""
        data, name = ((self.preprocessor, "preprocessor_config.json") if preprocessor
                      else (self.config, "config.json"))
        if field not in data or data[field] is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.dir / name}: `{field}` is missing; write the config "
                                  "with transformers' save_pretrained")
            return default
        return data[field]

    def fail(self, field: str, problem: str, fix: str, preprocessor: bool = False) -> ConfigError:
        name = "preprocessor_config.json" if preprocessor else "config.json"
        return ConfigError(f"{self.dir / name}: `{field}` {problem}; {fix}")

    def choice(self, field: str, choices: tuple, default: Any = _REQUIRED,
               preprocessor: bool = False) -> Any:
        """A field that must hold one of `choices` (the values slm computes exactly)."""
        value = self.get(field, default, preprocessor)
        if value not in choices:
            raise self.fail(field, f"is {value!r}",
                            f"slm's {self.get('model_type')} encoder computes only "
                            f"{', '.join(map(repr, choices))}", preprocessor)
        return value

    def prefix(self, architectures: dict[str, str]) -> str:
        """Where the encoder's tensors sit in the checkpoint (`model.encoder.` in a Whisper
        ForConditionalGeneration, `hubert.` in a HubertForCTC), by `architectures`."""
        names = self.get("architectures", [next(iter(architectures))])
        if len(names) != 1 or names[0] not in architectures:
            raise self.fail("architectures", f"is {names}",
                            f"slm reads {self.get('model_type')} encoders from "
                            f"{', '.join(sorted(architectures))}")
        return architectures[names[0]]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where one slm parameter comes from: its HF name below the checkpoint's prefix (`{i}`
    marks a per-layer tensor, stacked over the parameter's leading `layers` axis; further names
    are older spellings of the same tensor), its HF shape, and the view from HF's layout to
    slm's (a transpose or reshape of the memory map, so nothing is read before slicing)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    to_slm: Callable[[np.ndarray], np.ndarray] = lambda a: a


def vector(name: str, size: int) -> Tensor:
    return Tensor((name,), (size,))


def matrix(name: str, out: int, inp: int) -> Tensor:
    """A linear layer's weight: HF `[out, in]` -> slm `[in, out]`."""
    return Tensor((name,), (out, inp), lambda w: w.T)


def kernel(names: tuple[str, ...], out: int, inp: int, size: int) -> Tensor:
    """A Conv1d kernel: HF `[out, in, K]` -> slm `[K, in, out]`."""
    return Tensor(names, (out, inp, size), lambda w: w.transpose(2, 1, 0))


def norm(path: tuple, name: str, size: int) -> dict[tuple, Tensor]:
    """A LayerNorm (or GroupNorm): HF `weight`/`bias` -> slm `scale`/`bias`."""
    return {(*path, "scale"): vector(f"{name}.weight", size),
            (*path, "bias"): vector(f"{name}.bias", size)}


def _reader(files: TensorFiles, prefix: str, tensor: Tensor, num_layers: int) -> Reader:
    name = next((prefix + n for n in tensor.names if prefix + n.format(i=0) in files),
                prefix + tensor.names[0])
    if "{i}" not in name:
        view = tensor.to_slm(files.get(name, tensor.shape))
        return lambda idx: view[tuple(idx)]
    views = [tensor.to_slm(files.get(name.format(i=i), tensor.shape)) for i in range(num_layers)]
    return lambda idx: np.stack([views[i][tuple(idx[1:])]
                                 for i in range(idx[0].start, idx[0].stop)])


def safetensors_files(model_dir: Path) -> TensorFiles:
    if not any((model_dir / f).is_file()
               for f in ("model.safetensors", "model.safetensors.index.json")):
        raise CheckpointError(f"{model_dir / 'model.safetensors'}: no such file (nor "
                              "model.safetensors.index.json); slm reads encoder weights from "
                              "safetensors only: re-save the model with "
                              "save_pretrained(path, safe_serialization=True)")
    return TensorFiles(model_dir)


def load_weights(build: Callable[[], Any], model_dir: Path, prefix: str,
                 mesh: Mesh | None) -> tuple[Any, LoadStats]:
    """The encoder `build()` makes, each parameter read from `model_dir` as its `hf_tensors()`
    says, and sharded by its logical axis names on `mesh` (one device when None)."""
    files = safetensors_files(model_dir)
    with nnx.use_eager_sharding(False):  # shardings come from slm.parallel.rules, below
        abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    if mesh is None:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    else:
        shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(state)), shapes, mesh)
    flat_shapes = traverse_util.flatten_dict(shapes)
    flat_shardings = traverse_util.flatten_dict(shardings)
    tensors = abstract.hf_tensors()
    readers = {path: _reader(files, prefix, tensors[path], shape.shape[0])
               for path, shape in flat_shapes.items()}
    flat, largest = read_sharded(readers, flat_shapes, flat_shardings)
    params = traverse_util.unflatten_dict(flat)
    total = sum(s.size * s.dtype.itemsize for s in flat_shapes.values())
    return nnx.merge(graphdef, params), LoadStats(total, device_bytes(params), largest)
