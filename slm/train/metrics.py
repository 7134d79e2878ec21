"""What a long run shows: a progress bar (step, loss, tokens/s, ETA) and TensorBoard scalars."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """A tqdm bar whose postfix carries loss and tokens/s; ETA and steps/s come from tqdm."""

    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, desc="train")
        self.tokens_per_step = tokens_per_step
        self.last_time, self.last_step = time.perf_counter(), start

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        rate = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
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
