"""The training loop: sharded state, exact resume, checkpoints on policy and on SIGTERM, and a
hard stop on a non-finite loss that never overwrites a good checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from slm.config import Config
from slm.data import TokenSource, make_source
from slm.data.source import with_speech_input
from slm.errors import ConfigError, TrainingInterrupted
from slm.parallel.distributed import host_batch_shard
from slm.parallel.mesh import make_mesh
from slm.parallel.rules import batch_sharding
from slm.strategies import with_strategy_streams
from slm.strategies.tasks import with_task_tokens
from slm.train.checkpoint import Checkpointer, read_saved, restore_params
from slm.train.evaluate import heldout_batches, heldout_losses, make_eval_step
from slm.train.metrics import Profile, Progress, Scalars, host_metrics
from slm.train.optim import learning_rate, make_optimizer
from slm.train.state import StatePlan, TrainState, init_params, init_train_state, plan_state
from slm.train.step import lora_dropout_key, make_train_step
from slm.train.trainable import is_adapter, merge_trees, paths
from slm.vocab import Vocab


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    plan: StatePlan
    history: list[dict]  # host metrics of every step run in this call, with its perf_counter `time`
    stopped_by_signal: bool = False


def vocab_from_config(config: Config) -> Vocab:
    """The trained tokenizers' vocabulary if `tokenizers.dir` is set, else that of the
    checkpoint `checkpoint.init_from` starts from (a converted LLM's tokenizer), else one of
    `vocab` sizes; with the specials `strategy.task_format` needs (none by default)."""
    return with_task_tokens(_base_vocab(config), config.strategy.task_format)


def _base_vocab(config: Config) -> Vocab:
    if config.tokenizers.dir:
        from slm.data.tokenizers import VOCAB_FILE

        return Vocab.load(Path(config.tokenizers.dir) / VOCAB_FILE)
    if config.checkpoint.init_from:
        return read_saved(config.checkpoint.init_from)[1]
    v = config.vocab
    return Vocab.build(text_size=v.text_size, num_units=v.num_units, num_codebooks=v.num_codebooks,
                       codebook_size=v.codebook_size, extra_specials=v.extra_specials)


@contextlib.contextmanager
def _stop_requests():
    """`requested(step)`: whether to save and stop after `step` (SIGTERM: preemption, scancel).

    With several processes every host must stop at the same step, or the others would wait
    forever in the next step's collectives: JAX's preemption service (which catches SIGTERM on
    any host) picks that step, so no Python handler may replace its own.
    """
    if jax.process_count() > 1:
        yield multihost_utils.reached_preemption_sync_point
        return
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: flag.is_set()
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield lambda step: flag.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    def __init__(self, config: Config, *, vocab: Vocab | None = None,
                 source: TokenSource | None = None, mesh=None, progress: bool = True):
        self.vocab = vocab or vocab_from_config(config)
        self.config = config = with_speech_input(with_strategy_streams(config, self.vocab))
        if config.data.seq_len > config.model.max_seq_len:
            raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
                              f"{config.model.max_seq_len}; raise the model's context or cut rows")
        self.mesh = mesh if mesh is not None else make_mesh(config.mesh)
        self.batch_sharding = batch_sharding(self.mesh, 3)
        self.source = source or make_source(
            config, self.vocab, *host_batch_shard(self.batch_sharding, config.data.batch_size))
        total = config.train.steps
        self.optimizer = make_optimizer(config.optim, total)
        self.plan = plan_state(config, self.vocab, self.mesh, self.optimizer)
        self.step_fn = make_train_step(self.plan, self.optimizer, learning_rate(config.optim, total),
                                       config.data.grad_accum, lora_dropout_key(config))
        self.checkpointer = (Checkpointer(config.checkpoint, config, self.vocab)
                             if config.checkpoint.dir else None)
        self.show_progress = progress

    def initial_state(self) -> TrainState:
        """The latest checkpoint if there is one (data position included), else step 0 with
        the parameters of `checkpoint.init_from`, else a fresh init."""
        if self.checkpointer and self.checkpointer.latest_step() is not None:
            state, data_state = self.checkpointer.restore(self.plan.abstract_state())
            self.source.set_state(data_state)
            return state
        params = None
        key = jax.random.fold_in(jax.random.key(self.config.seed), 0)
        if self.config.checkpoint.init_from:
            params = restore_params(self.config.checkpoint.init_from, self.plan, self.vocab)
            if len(paths(params)) < len(paths(self.plan.param_shapes)):  # a base, new adapters
                params = merge_trees(params, init_params(self.config, self.vocab, self.plan, key,
                                                         only=is_adapter))
        return init_train_state(self.config, self.vocab, self.plan, self.optimizer, key, params)

    def _heldout(self) -> tuple:
        """The jitted held-out loss and its fixed batches on the mesh, per task."""
        host = heldout_batches(self.config, self.vocab,
                               *host_batch_shard(self.batch_sharding, self.config.data.batch_size))
        return make_eval_step(self.plan), {name: [self._device_batch(b) for b in batches]
                                           for name, batches in host.items()}

    def _device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows -> global arrays of `data.batch_size` rows."""
        rows = self.config.data.batch_size
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (rows, *v.shape[1:]))
                for k, v in host_batch.items()}

    def run(self) -> TrainResult:
        config, ckpt = self.config, self.checkpointer
        state = self.initial_state()
        start, total = int(jax.device_get(state.step)), config.train.steps
        d = config.data
        progress = Progress(total, start, d.batch_size * d.seq_len * len(config.model.streams),
                            enabled=self.show_progress and jax.process_index() == 0)
        tb_dir = config.train.tensorboard_dir or (f"{config.checkpoint.dir}/tb" if ckpt else "")
        scalars = Scalars(tb_dir if jax.process_index() == 0 else "")
        history: list[dict] = []
        if start:
            progress.write(f"resumed from step {start} ({ckpt.directory})")
        heldout = self._heldout() if config.eval.every_steps else None
        profile = Profile(config.train.profile_steps, tb_dir)

        def settle(step: int, metrics) -> None:
            """Bring one step's metrics to the host; stop on a non-finite loss."""
            values = host_metrics(metrics, step, ckpt, "Lower optim.learning_rate or "
                                  "optim.clip_norm, or check the data's weights.")
            history.append({"step": step, "time": time.perf_counter(), **values})
            progress.update(step, values["loss"])
            if step % config.train.log_every == 0 or step == total:
                scalars.write(step, values)

        def evaluate(step: int, params) -> None:
            """Held-out losses of `step`'s parameters, beside its training metrics."""
            values = heldout_losses(heldout[0], params, heldout[1])
            history[-1].update(values)
            scalars.write(step, values)
            progress.write(f"step {step} held-out loss: " + ", ".join(
                f"{name} {values[f'eval/{name}/loss']:.4f}" for name in heldout[1]))

        stopped = False
        with _stop_requests() as stop_requested:
            pending = None
            try:
                for step in range(start + 1, total + 1):
                    batch = self._device_batch(next(self.source))
                    data_state = self.source.get_state()
                    profile.before(step)
                    state, metrics = self.step_fn(state, batch)
                    if pending:  # overlap: read step n-1 while step n runs
                        settle(*pending)
                    pending = (step, metrics)
                    evaluating = heldout and (step % config.eval.every_steps == 0 or step == total)
                    if profile.after(step, metrics) or evaluating:
                        settle(*pending)
                        pending = None
                    if evaluating:
                        evaluate(step, state.params)
                    stopped = stop_requested(step)
                    if ckpt and (stopped or step == total or ckpt.manager.should_save(step)):
                        if pending:
                            settle(*pending)
                            pending = None
                        ckpt.save(state, data_state, force=stopped or step == total)
                    if stopped:
                        progress.write(f"SIGTERM: saved step {step}, exiting"
                                       if ckpt else f"SIGTERM: stopped after step {step}")
                        break
                if pending:
                    settle(*pending)
            finally:
                profile.stop()
                if ckpt:
                    ckpt.wait()
                progress.close()
                scalars.close()
        return TrainResult(state, self.plan, history, stopped)


def train(config: Config, **kwargs) -> TrainResult:
    trainer = Trainer(config, **kwargs)
    try:
        return trainer.run()
    finally:
        if trainer.checkpointer:
            trainer.checkpointer.close()


def train_to_the_end(config: Config) -> TrainResult:
    """`train` for callers that go on to use the model (`slm ablate`, `slm demo`): a run that
    SIGTERM stopped short of `train.steps` raises instead of handing back a half-trained
    model that would be evaluated as if finished."""
    result = train(config)
    if result.stopped_by_signal:
        resume = (f"its checkpoint in {config.checkpoint.dir} resumes it" if config.checkpoint.dir
                  else "nothing was saved (no checkpoint.dir)")
        raise TrainingInterrupted(f"training stopped by SIGTERM before step {config.train.steps}; "
                                  f"{resume}: run the same command again to finish")
    return result
