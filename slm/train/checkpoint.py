"""Orbax checkpoints holding everything a run needs to continue exactly.

One checkpoint = train state (params, optimizer, step) + data-iterator state + config +
vocabulary. Orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-save never leaves a half checkpoint that looks finished. Every host saves and
restores together; the data position is kept per host, since each reads its own rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from slm.config import MOVED_KEYS, CheckpointConfig, Config, config_to_dict
from slm.errors import CheckpointError
from slm.strategies import STRATEGIES
from slm.train.state import StatePlan, TrainState
from slm.train.trainable import ParamPath, is_adapter, is_base, paths, split_tree
from slm.vocab import Vocab


class HostDataHandler(ocp.CheckpointHandler):
    """Each process's data-iterator state in its own JSON file (orbax's JSON item is written
    by the primary host alone, which would give every host the primary's position)."""

    @staticmethod
    def _file(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "HostDataSave") -> None:
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "HostDataRestore" = None) -> dict:
        path = self._file(directory)
        if not path.exists():
            saved = sorted(p.name for p in directory.glob("process_*.json"))
            raise CheckpointError(
                f"{directory}: no data position for process {jax.process_index()} of "
                f"{jax.process_count()} (saved: {saved}); resume with as many processes as "
                "wrote the checkpoint"
            )
        return json.loads(path.read_text())


@ocp.args.register_with_handler(HostDataHandler, for_save=True)
@dataclasses.dataclass
class HostDataSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(HostDataHandler, for_restore=True)
@dataclasses.dataclass
class HostDataRestore(ocp.args.CheckpointArgs):
    pass


def _save_policy(cfg: CheckpointConfig) -> policies.SaveDecisionPolicy:
    chosen = [policies.FixedIntervalPolicy(cfg.every_steps)]
    if cfg.every_seconds > 0:
        chosen.append(policies.ContinuousCheckpointingPolicy(
            minimum_interval_secs=max(1, int(cfg.every_seconds))))
    return policies.AnySavePolicy(chosen)


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, config: Config, vocab: Vocab):
        self.directory = Path(cfg.dir).absolute()
        self.config, self.vocab = config, vocab
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            save_decision_policy=_save_policy(cfg),
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
        """Save if the step/time policy says so (or `force`); returns whether a save started."""
        step = int(jax.device_get(state.step))
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=HostDataSave(data_state),
                config=ocp.args.JsonSave(config_to_dict(self.config)),
                vocab=ocp.args.JsonSave(self.vocab.to_json()),
            ),
            force=force,
        )

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore into `target` (shapes with shardings); refuse another vocabulary's checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        saved_vocab = Vocab.from_json(
            self.manager.restore(step, args=ocp.args.Composite(vocab=ocp.args.JsonRestore())).vocab
        )
        saved_vocab.check_compatible(self.vocab, str(where))
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                        data=HostDataRestore()),
            )
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{where}: does not match the current model config ({err}); resume with the "
                "config the checkpoint was written with (its model section and train.trainable)"
            ) from err
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _reader(directory: Path, where: str) -> ocp.CheckpointManager:
    """A manager over checkpoints that must already exist (a manager would create the
    directory, leaving an empty one behind a mistyped path)."""
    if directory.is_dir():
        manager = ocp.CheckpointManager(directory)
        if manager.latest_step() is not None:
            return manager
        manager.close()
    raise CheckpointError(f"{where}: no checkpoint there (slm train or slm convert hf writes one)")


def restore_params(directory: str | Path, plan: StatePlan, vocab: Vocab,
                   where: str = "checkpoint.init_from",
                   keep: Callable[[ParamPath], bool] | None = None) -> Any:
    """The parameters of the latest checkpoint in `directory`, read straight into `plan`'s
    shapes and shardings (each host reads only its shards); the checkpoint's optimizer state
    and step are never read, so they need not fit this run's optimizer. `keep`: only the paths
    it accepts; by default all, or the base alone from a checkpoint without LoRA adapters (the
    trainer then adds fresh ones)."""
    directory = Path(directory).absolute()
    where = f"{where}={directory}"
    manager = _reader(directory, where)
    try:
        step = manager.latest_step()
        saved = manager.restore(step, args=ocp.args.Composite(vocab=ocp.args.JsonRestore(),
                                                              config=ocp.args.JsonRestore()))
        Vocab.from_json(saved.vocab).check_compatible(vocab, where)
        params = plan.abstract_state().params
        adapted = saved.config.get("model", {}).get("lora", {}).get("rank", 0) > 0
        if adapted and not any(is_adapter(path) for path in paths(params)):
            raise CheckpointError(f"{where}: has LoRA adapters that this config's model lacks; "
                                  "keep the model.lora section it was written with")
        if keep is None and not adapted:
            keep = is_base
        target = {"params": params if keep is None else split_tree(params, keep)[0]}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{where}: its parameters do not fit this config's model ({err}); use the model "
                f"section it was written with ({directory / str(step) / 'config'})") from err
    finally:
        manager.close()
    return restored.state["params"]


def read_saved(directory: str | Path, step: int | None = None) -> tuple[Config, Vocab, int]:
    """The config and vocabulary a checkpoint was written with, and its step."""
    from slm.config import config_from_dict

    directory = Path(directory).absolute()
    manager = _reader(directory, str(directory))
    step = manager.latest_step() if step is None else step
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                          vocab=ocp.args.JsonRestore()))
    manager.close()
    config = config_from_dict(_with_strategy_options(saved.config))
    return config, Vocab.from_json(saved.vocab), step


def _with_strategy_options(saved: dict) -> dict:
    """A config saved while strategy options were flat keys (`strategy.task`, ...), with the
    options its strategy takes moved under `strategy.options` and the other strategies' dropped.
    A checkpoint cannot be edited as an old YAML can, so it is migrated instead of refused."""
    strategy = saved.get("strategy", {})
    old_keys = [path.removeprefix("strategy.") for path in MOVED_KEYS]
    flat = {key: strategy.pop(key) for key in old_keys if key in strategy}
    if flat and strategy.get("name"):
        taken = {f.name for f in dataclasses.fields(STRATEGIES[strategy["name"]].options)}
        strategy["options"] = {key: value for key, value in flat.items() if key in taken}
    return saved


def load_model(directory: str | Path, step: int | None = None, mesh=None):
    """(model, config, vocab) for sampling and export, from a training checkpoint or from an
    adapters-only directory over its base (slm.train.adapters). LoRA adapters come folded into
    the base weights: the model has none, and the config says so (model.lora.rank 0)."""
    from slm.train.adapters import ADAPTER_FILE, load_adapted

    if (Path(directory) / ADAPTER_FILE).is_file():
        params, config, vocab = load_adapted(directory, mesh)
    else:
        config, vocab, step = read_saved(directory, step)
        plan = plan_for(config, vocab, mesh)
        cfg = dataclasses.replace(config.checkpoint, dir=str(directory))
        checkpointer = Checkpointer(cfg, config, vocab)
        state, _ = checkpointer.restore(plan.abstract_state(), step)
        checkpointer.close()
        params = state.params
    model, config = merged_model(params, config, vocab)
    return model, config, vocab


def plan_for(config: Config, vocab: Vocab, mesh=None) -> StatePlan:
    """The state plan of a saved run's config, on `mesh` or the one its config names.

    On a given mesh (one to decode on) the replication guard does not apply: it bounds what
    training replicates, where the optimizer state copies every replicated byte twice more;
    a decode mesh that splits heads may keep a small model's vectors whole on every device."""
    from slm.parallel.mesh import make_mesh
    from slm.train.optim import make_optimizer
    from slm.train.state import plan_state

    optimizer = make_optimizer(config.optim, config.train.steps)
    if mesh is None:
        return plan_state(config, vocab, make_mesh(config.mesh), optimizer)
    unguarded = dataclasses.replace(config.mesh, max_replicated_fraction=1.0)
    return plan_state(dataclasses.replace(config, mesh=unguarded), vocab, mesh, optimizer)


def merged_model(params: dict, config: Config, vocab: Vocab):
    """(model, config) with any LoRA adapters of `params` folded into their base weights; the
    config is the merged model's (no adapters, nothing frozen)."""
    from flax import nnx

    from slm.model import lora
    from slm.train.state import abstract_model

    if config.model.lora.rank:
        params = lora.merge(params, config.model.lora)  # eager: untouched weights stay as they are
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, lora=lora.without_lora(config.model.lora)),
            train=dataclasses.replace(config.train, trainable=["all"]))
    return nnx.merge(abstract_model(config, vocab)[0], params), config
