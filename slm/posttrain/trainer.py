"""The post-training loop: rollouts from the current weights, a method's loss minimised by
`slm train`'s own step, and `slm train`'s checkpoints, progress bar and TensorBoard scalars.

A run starts from `checkpoint.init_from`, whose parameters stay on device, frozen, as the
reference (DPO, GRPO). Everything a step does is a function of the checkpointed state and
the step number: its questions (`Prompts`: keyed by seed and step), its rollout key
(the seed folded with the step) and its updates, so a resumed run continues bit for bit.
Updates go through `slm.train.step.make_train_step` with the method's objective, so which
parameters train (and carry optimizer state) is decided where `slm train` decides it.
A GRPO step applies `posttrain.grpo.iterations` updates to one batch of rollouts; as in
`slm train`, checkpoints are numbered (and `checkpoint.every_steps` counts) by optimizer
updates, and they fall between steps, never inside one.
"""

from __future__ import annotations

import time

import jax
import optax

from slm.config import Config
from slm.data.source import with_speech_input
from slm.errors import CheckpointError, ConfigError
from slm.parallel.mesh import make_mesh
from slm.posttrain import METHODS, MethodSetup
from slm.strategies import with_strategy_streams
from slm.train.checkpoint import Checkpointer, restore_params
from slm.train.metrics import Progress, Scalars, host_metrics
from slm.train.optim import learning_rate, make_optimizer
from slm.train.state import TrainState, init_train_state, plan_state
from slm.train.step import make_train_step
from slm.train.trainer import TrainResult, _stop_requests, vocab_from_config

SHOWN = ("reward", "kl", "accuracy")  # on the progress bar, where a method reports them


def start_setup(config: Config, total_updates: int, mesh=None
                ) -> tuple[MethodSetup, optax.GradientTransformation]:
    """What a run from `checkpoint.init_from` is built from (its config resolved: the
    strategy's streams and speech input), and its optimizer over `total_updates` updates."""
    vocab = vocab_from_config(config)
    config = with_speech_input(with_strategy_streams(config, vocab))
    if not config.checkpoint.init_from:
        raise ConfigError("post-training starts from a trained model: set "
                          "checkpoint.init_from to a checkpoint directory of `slm train` "
                          "(its parameters are also the frozen reference)")
    mesh = mesh if mesh is not None else make_mesh(config.mesh)
    optimizer = make_optimizer(config.optim, total_updates)
    return MethodSetup(config, vocab, plan_state(config, vocab, mesh, optimizer), mesh), optimizer


class PostTrainer:
    def __init__(self, config: Config, method: str, *, mesh=None, progress: bool = True):
        plugin = METHODS[method]
        self.name = method
        self.updates = plugin.updates(config)
        total = config.train.steps * self.updates
        self.setup, self.optimizer = start_setup(config, total, mesh)
        self.config = config = self.setup.config
        self.vocab, self.plan, self.mesh = self.setup.vocab, self.setup.plan, self.setup.mesh
        self.method = plugin.build(self.setup)
        self.step_fn = make_train_step(self.plan, self.optimizer,
                                       learning_rate(config.optim, total),
                                       objective=self.method.objective)
        self.checkpointer = (Checkpointer(config.checkpoint, config, self.vocab)
                             if config.checkpoint.dir else None)
        self.show_progress = progress

    def position(self, step: int) -> dict:
        """The data state a checkpoint keeps: how many questions (or pairs) were used."""
        return {"method": self.name, "asked": step * self.config.posttrain.prompts}

    def initial_state(self) -> TrainState:
        """The latest checkpoint if there is one, else step 0 at `checkpoint.init_from`."""
        ckpt = self.checkpointer
        if ckpt and ckpt.latest_step() is not None:
            state, saved = ckpt.restore(self.plan.abstract_state())
            step = int(jax.device_get(state.step)) // self.updates
            if saved != self.position(step):
                raise CheckpointError(
                    f"{ckpt.directory}: its position {saved} is not {self.position(step)}; "
                    "resume with the method, posttrain.prompts and posttrain.grpo.iterations "
                    "it was written with")
            return state
        params = restore_params(self.config.checkpoint.init_from, self.plan, self.vocab)
        key = jax.random.fold_in(jax.random.key(self.config.seed), 0)
        return init_train_state(self.config, self.vocab, self.plan, self.optimizer, key, params)

    def run(self) -> TrainResult:
        config, ckpt = self.config, self.checkpointer
        state = self.initial_state()
        start, total = int(jax.device_get(state.step)) // self.updates, config.train.steps
        rollout = self.setup.rollout
        reply_tokens = self.method.replies_per_step * rollout.steps * len(rollout.sampler.streams)
        progress = Progress(total, start, reply_tokens, desc=self.name,
                            enabled=self.show_progress and jax.process_index() == 0)
        tb_dir = config.train.tensorboard_dir or (f"{config.checkpoint.dir}/tb" if ckpt else "")
        scalars = Scalars(tb_dir if jax.process_index() == 0 else "")
        history: list[dict] = []
        if start:
            progress.write(f"resumed from step {start} ({ckpt.directory})")
        stopped = False
        with _stop_requests() as stop_requested:
            try:
                for step in range(start + 1, total + 1):
                    key = jax.random.fold_in(jax.random.key(config.seed), step)
                    batch, host = self.method.batch(state.params, step, key)
                    for _ in range(self.updates):
                        state, metrics = self.step_fn(state, batch)
                    values = self._settle(step, metrics, host)
                    history.append(values)
                    progress.update(step, values["loss"],
                                    **{k: values[k] for k in SHOWN if k in values})
                    if step % config.train.log_every == 0 or step == total:
                        scalars.write(step, {k: v for k, v in values.items()
                                             if k not in ("step", "time")})
                    stopped = stop_requested(step)
                    due = ckpt and ckpt.manager.should_save(int(jax.device_get(state.step)))
                    if ckpt and (stopped or step == total or due):
                        ckpt.save(state, self.position(step), force=True)
                    if stopped:
                        progress.write(f"SIGTERM: saved step {step}, exiting"
                                       if ckpt else f"SIGTERM: stopped after step {step}")
                        break
            finally:
                if ckpt:
                    ckpt.wait()
                progress.close()
                scalars.close()
        return TrainResult(state, self.plan, history, stopped)

    def _settle(self, step: int, metrics, host: dict) -> dict:
        """One step's metrics on the host; a non-finite loss stops the run unsaved."""
        values = host_metrics(metrics, step, self.checkpointer, "Lower optim.learning_rate, "
                              "or posttrain.dpo.beta / posttrain.grpo.kl_beta.", f"{self.name} loss")
        return {"step": step, "time": time.perf_counter(), **values, **host}


def posttrain(config: Config, method: str, **kwargs) -> TrainResult:
    trainer = PostTrainer(config, method, **kwargs)
    try:
        return trainer.run()
    finally:
        if trainer.checkpointer:
            trainer.checkpointer.close()
