"""Lazy reads of a checkpoint's tensors, and a streaming safetensors writer.

Reads memory-map the files and hand out numpy views, so slicing one device's shard touches only
those bytes: a model larger than the host's memory can be loaded into a mesh piece by piece.
The safetensors format (8-byte header length, JSON header, raw little-endian data) is parsed
here because safetensors' own numpy backend cannot represent bfloat16, the dtype most
checkpoints ship in; `ml_dtypes` (a jax dependency) can. `pytorch_model*.bin` files are read
with `torch.load(weights_only=True, mmap=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from slm.errors import CheckpointError, MissingToolError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def _safetensors_views(path: Path) -> dict[str, np.ndarray]:
    """Name -> memory-mapped view, for every tensor of one .safetensors file."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        (size,) = struct.unpack("<Q", bytes(raw[:8]))
        header = json.loads(bytes(raw[8:8 + size]))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    views = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which slm "
                                  f"does not read; supported: {', '.join(DTYPES)}")
        start, stop = (8 + size + o for o in info["data_offsets"])
        views[name] = raw[start:stop].view(DTYPES[info["dtype"]]).reshape(info["shape"])
    return views


def _torch_views(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise MissingToolError(f"{path}: reading .bin checkpoints needs torch (pip install torch), "
                               "or re-save the model with safetensors") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises bare pickle/runtime errors for unsafe or bad files
        raise CheckpointError(f"{path}: not a plain tensor state dict ({err}); re-save the model "
                              "with save_pretrained(..., safe_serialization=True)") from err

    def view(t):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return {name: view(t) for name, t in state.items()}


class TensorFiles:
    """All tensors of a checkpoint directory, by name, as lazily read numpy views."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._views: dict[str, np.ndarray] = {}
        for path, reader in self._files():
            self._views.update(reader(path))

    def _files(self) -> list[tuple[Path, Callable[[Path], dict]]]:
        for suffix, reader in ((".safetensors", _safetensors_views), (".bin", _torch_views)):
            stem = "model" if suffix == ".safetensors" else "pytorch_model"
            index = self.dir / f"{stem}{suffix}.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                return [(self.dir / f, reader) for f in sorted(set(weight_map.values()))]
            if (self.dir / f"{stem}{suffix}").is_file():
                return [(self.dir / f"{stem}{suffix}", reader)]
        raise CheckpointError(f"{self.dir}: no model.safetensors, model.safetensors.index.json or "
                              "pytorch_model.bin; save the model with save_pretrained")

    def __contains__(self, name: str) -> bool:
        return name in self._views

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name` (not yet read), checked to have `shape`."""
        if name not in self._views:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing; the files do not match "
                                  "config.json")
        view = self._views[name]
        if tuple(view.shape) != tuple(shape):
            raise CheckpointError(f"{self.dir}: tensor {name} has shape {tuple(view.shape)}, "
                                  f"config.json implies {tuple(shape)}")
        return view


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, tuple, np.dtype, Callable]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors given as (name, shape, dtype, produce) one at a time, so only one tensor is
    ever held on the host; `produce()` returns its array. Written to a temporary name, then
    renamed, so a crash never leaves a file that looks complete."""
    entries, offset = {}, 0
    tensors = list(tensors)
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        entries[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        entries["__metadata__"] = metadata
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors writes it
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, shape, dtype, produce in tensors:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise CheckpointError(f"{name}: produced shape {array.shape}, declared {shape}")
            f.write(array.reshape(-1).view(np.uint8).data)
    tmp.replace(path)
