"""Held-out loss while training: per task of the mixture and per stream, on fixed batches.

The training loss of a tiny model falls to ~0 by memorizing; the loss on examples it never
trained on is what says whether it still learns. Each task of `data.mixture` whose records
have a held-out split is scored on `eval.batches` batches of that split, laid out by the same
strategy and packed like training rows. The batches are drawn once, from their own sources,
so evaluating never moves the training data's position (a resumed run stays bitwise) and
every evaluation scores the same tokens. Written records (`text`, `text_dialogue`) have no
held-out split and are skipped; a synthetic source is scored on fresh batches of another seed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from slm.config import Config
from slm.data import make_source
from slm.data.examples import UNSPLIT_RECORDS, task
from slm.parallel.rules import batch_sharding
from slm.train.state import StatePlan

HOST_BATCH = dict[str, np.ndarray]


def heldout_batches(config: Config, vocab, process_index: int = 0,
                    process_count: int = 1) -> dict[str, list[HOST_BATCH]]:
    """This host's rows of `eval.batches` fixed batches per evaluated task."""
    n = config.eval.batches
    if config.data.source != "records":
        other_seed = dataclasses.replace(config, seed=config.seed + 1)
        source = make_source(other_seed, vocab, process_index, process_count)
        return {"synthetic": [next(source) for _ in range(n)]}
    batches = {}
    for name, weight in config.data.mixture.items():
        if weight <= 0 or task(name)[0] in UNSPLIT_RECORDS:
            continue
        one_task = dataclasses.replace(config, data=dataclasses.replace(
            config.data, mixture={name: 1.0}, split=config.eval.split))
        source = make_source(one_task, vocab, process_index, process_count)
        batches[name] = [next(source) for _ in range(n)]
    return batches


def make_eval_step(plan: StatePlan) -> Callable:
    """A jitted `(params, batch) -> loss and weight sums per stream`, sharded like the train step."""

    def sums(params, batch):
        segments = batch["segments"][:, 0] if "segments" in batch else None
        features = (batch["features"], batch["feature_mask"]) if "features" in batch else None
        with jax.sharding.use_abstract_mesh(plan.mesh.abstract_mesh):
            _, weight, metrics = plan.model(params).loss(batch["tokens"], batch["weights"],
                                                         segments, features)
        return {"weight": weight} | {k: v for k, v in metrics.items()
                                     if k.startswith(("loss_sum/", "weight_sum/"))}

    replicated = NamedSharding(plan.mesh, PartitionSpec())
    return jax.jit(sums, in_shardings=(plan.param_shardings, batch_sharding(plan.mesh, 3)),
                   out_shardings=replicated)


def heldout_losses(eval_step: Callable, params, batches: dict[str, list[dict]]) -> dict[str, float]:
    """`eval/<task>/loss` (every stream, token-weighted as the training loss) and
    `eval/<task>/loss/<stream>` per task."""
    out = {}
    for name, device_batches in batches.items():
        totals = jax.device_get(jax.tree.map(lambda *x: jnp.sum(jnp.stack(x)), *[
            eval_step(params, batch) for batch in device_batches]))
        streams = sorted(k.split("/", 1)[1] for k in totals if k.startswith("loss_sum/"))
        loss = sum(totals[f"loss_sum/{s}"] for s in streams)
        out[f"eval/{name}/loss"] = float(loss / max(totals["weight"], 1.0))
        for s in streams:
            if totals[f"weight_sum/{s}"] > 0:
                out[f"eval/{name}/loss/{s}"] = float(totals[f"loss_sum/{s}"] / totals[f"weight_sum/{s}"])
    return out
