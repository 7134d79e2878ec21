"""Saved artifacts (codecs, vocoders, centroids, indexes).

Writes go to a temporary name and are renamed, so a crash never leaves a half-written file that
looks complete (the same rule orbax follows for checkpoints); reads check the format and say
which file is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from slm.errors import CheckpointError


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Arrays as `.npz` (read back with `allow_pickle=False`: never pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def read_artifact(directory: str | Path, config_file: str, arrays_file: str, kind: str,
                  version: int, what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON config and `.npz` arrays of a saved `kind` artifact, checked for kind/format."""
    directory = Path(directory)
    try:
        config = json.loads((directory / config_file).read_text())
        with np.load(directory / arrays_file, allow_pickle=False) as npz:
            arrays = dict(npz)
    except (OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{directory}: not a saved {what} ({err})") from err
    got = (config.get("kind"), config.get("format")) if isinstance(config, dict) else config
    if got != (kind, version):
        raise CheckpointError(f"{directory / config_file}: expected a {kind!r} {what} of format "
                              f"{version}, got {got!r}")
    return config, arrays
