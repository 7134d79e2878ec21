"""The train state and its layout on the mesh, known before any parameter exists.

Parameters are created directly in their shards (a jitted init with `out_shardings`), so a model
larger than one device's memory never materialises whole. Parameters travel as plain nested
dicts of arrays: optax, orbax and `jax.jit` all take those without adapters, and `nnx.merge`
turns them back into a module inside the jitted functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slm.config import Config
from slm.errors import CheckpointError
from slm.model import SpeechLM
from slm.model.speech_encoder import pretrained_encoder
from slm.parallel.rules import check_replication, tree_shardings
from slm.train.trainable import ParamPath, Trainable, select, split_tree
from slm.vocab import Vocab

nnx.use_eager_sharding(False)  # shardings come from slm.parallel.rules, not from creation


@struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates applied so far
    params: Any  # all parameters, frozen ones included
    opt_state: Any  # over the trained parameters only (slm.train.trainable)


@dataclasses.dataclass
class StatePlan:
    """Graph, shapes and shardings of the model and its train state on one mesh."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    param_shapes: Any
    param_shardings: Any
    state_shapes: TrainState
    state_shardings: TrainState
    replicated_fraction: float
    trainable: Trainable

    def model(self, params) -> SpeechLM:
        return nnx.merge(self.graphdef, params)

    def abstract_state(self) -> TrainState:
        """Shapes with their shardings: the target a checkpoint restores into."""
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            self.state_shapes, self.state_shardings)


def abstract_model(config: Config, vocab: Vocab):
    """(graphdef, parameter shapes, parameter logical names) without allocating anything."""
    model = nnx.eval_shape(lambda: SpeechLM(config.model, vocab, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    names = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return graphdef, nnx.to_pure_dict(state), names


def plan_state(config: Config, vocab: Vocab, mesh: Mesh,
               optimizer: optax.GradientTransformation) -> StatePlan:
    graphdef, param_shapes, names = abstract_model(config, vocab)
    param_shardings = tree_shardings(names, param_shapes, mesh)
    fraction = check_replication(param_shapes, param_shardings, mesh,
                                 config.mesh.max_replicated_fraction)
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable = select(config.train.trainable, param_shapes)
    opt_shapes = jax.eval_shape(optimizer.init, trainable.split(param_shapes)[0])
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, opt_shapes, trainable.split(param_shardings)[0],
        transform_non_params=lambda _: replicated,
    )
    step_shape = jax.ShapeDtypeStruct((), jnp.int32)
    return StatePlan(
        mesh=mesh,
        graphdef=graphdef,
        param_shapes=param_shapes,
        param_shardings=param_shardings,
        state_shapes=TrainState(step_shape, param_shapes, opt_shapes),
        state_shardings=TrainState(replicated, param_shardings, opt_shardings),
        replicated_fraction=fraction,
        trainable=trainable,
    )


def init_params(config: Config, vocab: Vocab, plan: StatePlan, key: jax.Array,
                only: Callable[[ParamPath], bool] | None = None):
    """Fresh parameters, created shard by shard on the mesh; `only`: just the paths it accepts
    (XLA then skips creating the others: fresh adapters beside a restored base cost no more)."""

    def create(k):
        params = nnx.to_pure_dict(nnx.state(SpeechLM(config.model, vocab, nnx.Rngs(params=k))))
        return params if only is None else split_tree(params, only)[0]

    shardings = plan.param_shardings if only is None else split_tree(plan.param_shardings, only)[0]
    return jax.jit(create, out_shardings=shardings)(key)


def init_train_state(config: Config, vocab: Vocab, plan: StatePlan,
                     optimizer: optax.GradientTransformation, key: jax.Array,
                     params=None) -> TrainState:
    """Step 0 with fresh optimizer state, over fresh parameters or the given ones, with the
    speech encoder `model.speech_input.encoder_dir` names loaded over them."""
    params = init_params(config, vocab, plan, key) if params is None else params
    params = with_pretrained_encoder(params, config, plan)
    opt_state = jax.jit(optimizer.init, out_shardings=plan.state_shardings.opt_state)(
        plan.trainable.split(params)[0])
    step = jax.device_put(jnp.zeros((), jnp.int32), plan.state_shardings.step)
    return TrainState(step, params, opt_state)


def with_pretrained_encoder(params, config: Config, plan: StatePlan):
    """`params` with the in-model speech encoder's weights read from its saved recognizer."""
    weights = pretrained_encoder(config.model.speech_input)
    if weights is None:
        return params
    target = params["speech_encoder"]["weights"]
    shardings = plan.param_shardings["speech_encoder"]["weights"]
    if set(weights) != set(target) or any(weights[k].shape != target[k].shape for k in target):
        raise CheckpointError(f"model.speech_input.encoder_dir={config.model.speech_input.encoder_dir}: "
                              "its recognizer's tensors do not fit the model's encoder; set "
                              "model.speech_input.encoder_options to the recognizer's config")
    loaded = {k: jax.device_put(v, shardings[k]) for k, v in weights.items()}
    return {**params, "speech_encoder": {"weights": loaded}}
