"""What a long run shows: a progress bar (step, loss, tokens/s, ETA), TensorBoard scalars,
and a profiler trace of chosen steps."""

from __future__ import annotations

import sys
import time

import jax

from tqdm import tqdm

from slm.errors import ConfigError, TrainingDivergedError


def host_metrics(metrics, step: int, checkpointer, advice: str, what: str = "loss") -> dict:
    """One step's metrics on the host; a non-finite loss stops the run without saving it,
    naming the last good checkpoint and `advice` (what to lower)."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not values.pop("finite"):
        if checkpointer:
            checkpointer.wait()
        last = checkpointer.latest_step() if checkpointer else None
        raise TrainingDivergedError(
            f"{what} is {values['loss']} (grad norm {values['grad_norm']}) at step {step}; "
            f"stopped without saving it. Last good checkpoint: "
            f"{f'step {last} in {checkpointer.directory}' if last is not None else 'none'}. "
            f"{advice}")
    return values


class Progress:
    """A tqdm bar whose postfix carries loss and tokens/s; ETA and steps/s come from tqdm."""

    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True,
                 desc: str = "train"):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, desc=desc)
        self.tokens_per_step = tokens_per_step
        self.last_time, self.last_step = time.perf_counter(), start

    def update(self, step: int, loss: float, **shown: float) -> None:
        """`shown`: further values for the bar (post-training shows reward, KL, accuracy)."""
        now = time.perf_counter()
        rate = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}",
                             **{k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class Scalars:
    """TensorBoard event files (tensorboardX: no TensorFlow import in the training process)."""

    def __init__(self, logdir: str):
        self.writer = None
        if logdir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir)

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Profile:
    """A `jax.profiler` trace of steps `[first, last]` (`train.profile_steps`) into the
    TensorBoard directory, where its profile tab (tensorboard-plugin-profile) or Perfetto
    opens it; the model's blocks carry named scopes, so the trace reads by module."""

    def __init__(self, steps: list[int], logdir: str):
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ConfigError(f"train.profile_steps={steps}: give [first, last] steps, 1 <= first <= last")
        if steps and not logdir:
            raise ConfigError("train.profile_steps writes its trace beside the TensorBoard "
                              "scalars: set train.tensorboard_dir or checkpoint.dir")
        self.steps, self.logdir, self.tracing = steps, logdir, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.logdir)
            self.tracing = True

    def after(self, step: int, outputs) -> bool:
        """Whether the trace ended at `step` (its outputs were waited for, to be in it)."""
        if not (self.tracing and step == self.steps[1]):
            return False
        jax.block_until_ready(outputs)
        self.stop()
        return True

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
