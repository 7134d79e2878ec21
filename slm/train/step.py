"""The jitted train step: gradient accumulation, exact token-weighted loss, one optimizer update.

Gradients are taken with respect to the trained parameters only (slm.train.trainable); the
frozen ones enter the loss as constants and leave the step unchanged.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from slm.config import Config
from slm.parallel.rules import batch_sharding
from slm.train.state import StatePlan, TrainState

# "tokens" int32 [B, K, T], "weights" float32 [B, K, T], and from sources that pack several
# examples into a row, "segments" int32 [B, 1, T] (the example of each position; 0: padding);
# a model that hears speech features also gets "features" float32 [B, T, W, D] and
# "feature_mask" bool [B, T, W] (slm.strategies.hearing)
Batch = dict[str, jax.Array]

# (model, batch, LoRA dropout key or None) -> (loss sum, (loss weight, metrics)): sums, not
# means, so microbatches combine exactly. Metrics "loss_sum/<name>" with "weight_sum/<name>" are loss terms (the step reports
# their total over the weight as "loss", and each as "loss/<name>"); "stat_sum/<name>" with
# "stat_weight/<name>" are reported as their ratio "<name>" without entering the loss.
Objective = Callable[..., tuple[jax.Array, tuple[jax.Array, dict]]]


def cross_entropy(model, batch: Batch, key: jax.Array | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """Next-token cross-entropy of every stream: what `slm train` minimises."""
    segments = batch["segments"][:, 0] if "segments" in batch else None
    features = (batch["features"], batch["feature_mask"]) if "features" in batch else None
    total, weight, metrics = model.loss(batch["tokens"], batch["weights"], segments, features,
                                        key)
    return total, (weight, metrics)


def _microbatches(batch: Batch, grad_accum: int) -> Batch:
    """[B, ...] -> [A, B/A, ...] with row i of microbatch a = row a + A*i (keeps shards local)."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def lora_dropout_key(config: Config) -> jax.Array | None:
    """The key LoRA dropout draws from, folded with each step's number so that a resumed run
    draws the masks the uninterrupted one drew; None without dropout."""
    lora = config.model.lora
    if not (lora.rank and lora.dropout):
        return None
    return jax.random.fold_in(jax.random.key(config.seed), 1)  # 0 draws the initial parameters


def make_train_step(plan: StatePlan, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int = 1,
                    dropout_key: jax.Array | None = None,
                    objective: Objective = cross_entropy) -> Callable:
    """A jitted `(state, batch) -> (state, metrics)` with donated state and explicit shardings.

    Losses and gradients are summed over microbatches and divided once by the total loss
    weight, so accumulation gives the same update as one big batch. `objective` is what is
    minimised (post-training passes its own), so every method shares one update.
    """
    trainable = plan.trainable

    def loss_sum(trained, frozen, batch: Batch, key):
        return objective(plan.model(trainable.merge(trained, frozen)), batch, key)

    grad_fn = jax.grad(loss_sum, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        with jax.sharding.use_abstract_mesh(plan.mesh.abstract_mesh):  # for rules.constrain
            return sharded_step(state, batch)

    def summed_grads(trained, frozen, batch: Batch, key) -> tuple[dict, dict]:
        """Gradients and metrics summed over the microbatches; one microbatch runs without a
        loop (XLA keeps a one-trip scan as a loop around the whole model)."""
        if grad_accum == 1:
            grads, (weight, metrics) = grad_fn(trained, frozen, batch, key)
            return grads, metrics | {"weight": weight}
        micro = _microbatches(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: loss_sum(trained, frozen, first, key)[1][1])
        keys = None if key is None else jax.random.split(key, grad_accum)

        def accumulate(carry, micro_and_key):
            grads, (weight, metrics) = grad_fn(trained, frozen, *micro_and_key)
            carry = {
                "grads": jax.tree.map(jnp.add, carry["grads"], grads),
                "metrics": jax.tree.map(jnp.add, carry["metrics"], metrics | {"weight": weight}),
            }
            return carry, None

        carry = {
            "grads": jax.tree.map(jnp.zeros_like, trained),
            "metrics": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
            | {"weight": jnp.zeros((), jnp.float32)},
        }
        carry, _ = lax.scan(accumulate, carry, (micro, keys))
        return carry["grads"], carry["metrics"]

    def sharded_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        trained, frozen = trainable.split(state.params)
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, state.step)
        summed, sums = summed_grads(trained, frozen, batch, key)
        denominator = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / denominator, summed)
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        params = trainable.merge(optax.apply_updates(trained, updates), frozen)
        loss = sum(v for k, v in sums.items() if k.startswith("loss_sum/")) / denominator
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "loss_tokens": sums["weight"],
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        if "invalid_targets" in sums:
            metrics["invalid_targets"] = sums["invalid_targets"]
        for key, value in sums.items():
            kind, _, name = key.partition("/")
            if kind == "loss_sum":
                metrics[f"loss/{name}"] = value / jnp.maximum(sums[f"weight_sum/{name}"], 1.0)
            elif kind == "stat_sum":
                metrics[name] = value / jnp.maximum(sums[f"stat_weight/{name}"], 1.0)
        return TrainState(state.step + 1, params, opt_state), metrics

    replicated = NamedSharding(plan.mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(plan.state_shardings, batch_sharding(plan.mesh, 1)),  # every batch array
        out_shardings=(plan.state_shardings, replicated),
        donate_argnums=(0,),
    )
