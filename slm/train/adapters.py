"""Adapters-only checkpoints: what a run with frozen parameters trained, beside its base.

A run that trains LoRA adapters (and perhaps a projector) over a frozen multi-GB base changes a
few MB; `save_adapters` writes just those, with `adapter.json` naming the base checkpoint by
path and by a checksum of the frozen parameters. Trained parameters mean nothing over another
base, so `load_adapted` recomputes the base's checksum and refuses one that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

from slm.config import Config, config_from_dict, config_to_dict
from slm.errors import AdapterBaseError, CheckpointError
from slm.train.checkpoint import Checkpointer, plan_for, read_saved, restore_params
from slm.train.trainable import merge_trees, paths
from slm.vocab import Vocab

ADAPTER_FILE = "adapter.json"
PARAMS_DIR = "params"
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _fingerprint(x: jax.Array) -> jax.Array:
    """Two position-weighted sums of `x`'s bits, mod 2^32. Integer sums do not depend on the
    order of addition, so every mesh gives the same value, computed where the shards are."""
    bits = lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    weight = index * jnp.uint32(0x9E3779B1) + jnp.uint32(1)
    mixed = (bits ^ (bits >> 13)) * jnp.uint32(0x85EBCA6B)
    return jnp.stack([jnp.sum(bits * weight, dtype=jnp.uint32),
                      jnp.sum(mixed ^ index, dtype=jnp.uint32)])


def checksum(params: dict) -> str:
    """A checksum of a parameter tree's paths, shapes, dtypes and values, on any mesh."""
    sums = jax.device_get(jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))(params))
    digest = hashlib.sha256()
    for path, leaf, sum_ in zip(paths(params), jax.tree.leaves(params), jax.tree.leaves(sums)):
        digest.update(f"{'/'.join(path)}:{tuple(leaf.shape)}:{leaf.dtype}:".encode())
        digest.update(np.asarray(sum_).tobytes())
    return digest.hexdigest()


def base_of(directory: str | Path) -> Path | None:
    """The base checkpoint an adapter directory names; None for any other directory."""
    manifest = Path(directory) / ADAPTER_FILE
    return Path(json.loads(manifest.read_text())["base"]) if manifest.is_file() else None


def save_adapters(run: str | Path, out: str | Path) -> Path:
    """The trained parameters of the latest checkpoint in `run` (a run started from a base by
    `checkpoint.init_from`, with frozen parameters) to `out`, naming that base."""
    run, out = Path(run).absolute(), Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new --out or remove it")
    config, vocab, step = read_saved(run)
    if not config.checkpoint.init_from:
        raise CheckpointError(f"{run}: started from no base checkpoint (checkpoint.init_from), "
                              "so its trained parameters alone could not be loaded; save the "
                              "whole checkpoint instead")
    plan = plan_for(config, vocab)
    if plan.trainable.everything:
        raise CheckpointError(f"{run}: train.trainable={config.train.trainable} trains every "
                              "parameter, so there is no frozen base to refer to; train with "
                              "train.trainable=[lora] (or [projector, lora])")
    checkpointer = Checkpointer(dataclasses.replace(config.checkpoint, dir=str(run)), config, vocab)
    state, _ = checkpointer.restore(plan.abstract_state(), step)
    checkpointer.close()
    trained, frozen = plan.trainable.split(state.params)
    manifest = {"base": str(Path(config.checkpoint.init_from).absolute()),
                "base_checksum": checksum(frozen), "run": str(run), "step": step,
                "config": config_to_dict(config), "vocab": vocab.to_json()}
    out.mkdir(parents=True, exist_ok=True)
    writer = ocp.StandardCheckpointer()
    writer.save(out / PARAMS_DIR, trained)
    writer.wait_until_finished()
    writer.close()
    if jax.process_index() == 0:
        (out / ADAPTER_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def load_adapted(directory: str | Path, mesh=None,
                 base: str | Path | None = None) -> tuple[dict, Config, Vocab]:
    """(parameters, config, vocabulary) of the adapted model: the base's frozen parameters with
    the saved trained ones. `base`: where the base is now, if it moved since saving."""
    directory = Path(directory).absolute()
    manifest = json.loads((directory / ADAPTER_FILE).read_text())
    config, vocab = config_from_dict(manifest["config"]), Vocab.from_json(manifest["vocab"])
    base = Path(base or manifest["base"])
    plan = plan_for(config, vocab, mesh)
    trained_shapes, _ = plan.trainable.split(plan.abstract_state().params)
    frozen = restore_params(base, plan, vocab, where=f"{directory / ADAPTER_FILE}: base",
                            keep=lambda path: path not in plan.trainable.chosen)
    found = checksum(frozen)
    if found != manifest["base_checksum"]:
        raise AdapterBaseError(
            f"{directory}: trained over a base with checksum {manifest['base_checksum'][:16]}, "
            f"but {base} has {found[:16]}: that base changed or is another model; load the "
            "adapters over the checkpoint they were trained from")
    reader = ocp.StandardCheckpointer()
    trained = reader.restore(directory / PARAMS_DIR, trained_shapes)
    reader.close()
    return merge_trees(trained, frozen), config, vocab
