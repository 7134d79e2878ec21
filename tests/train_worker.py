"""A training run in its own process, for tests that kill or signal it (see test_train.py).

    python tests/train_worker.py CONFIG [key=value ...] [--block-at N] [--sleep S]

Trains CONFIG (with overrides) on one CPU device from `slm.data.synthetic.SyntheticTokens`,
wrapped so that the test can control where the process is when it is interrupted:

  --block-at N  when asked for batch N (1-based, i.e. the batch of step N if the run started at
                step 0), sleep forever: the process is guaranteed to be mid-run, between the
                checkpoints before N and the end, until the test kills it.
  --sleep S     sleep S seconds before every batch, so a signal lands during a run.
  --devices N   simulated CPU devices on the platform (default 1); training uses one of them.
                XLA's CPU numerics depend on N even on a one-device mesh (the intra-op work is
                split differently), so a run compared bit for bit with another process must use
                that process's N.

It prints `BATCH n` (flushed) each time it hands out batch n, and at the end one line
`RESULT {json}` with the final step and `TrainResult.stopped_by_signal`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class ControlledTokens:
    """SyntheticTokens that report each batch and may sleep before it or block at one."""

    def __init__(self, inner, block_at: int, sleep: float):
        self.inner, self.block_at, self.sleep = inner, block_at, sleep

    def __iter__(self):
        return self

    def __next__(self):
        number = self.inner.step + 1  # 1-based number of the batch about to be handed out
        if self.block_at and number >= self.block_at:
            print(f"BLOCKED {number}", flush=True)
            while True:
                time.sleep(3600)
        if self.sleep:
            time.sleep(self.sleep)
        batch = next(self.inner)
        print(f"BATCH {number}", flush=True)
        return batch

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--block-at", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()

    # Whatever the parent set (pytest's conftest asks for 8 devices); before jax is imported.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from slm.config import load_config
    from slm.data.synthetic import SyntheticTokens
    from slm.train.trainer import train, vocab_from_config

    config = load_config(args.config, args.overrides)
    vocab = vocab_from_config(config)
    source = ControlledTokens(SyntheticTokens(config, vocab), args.block_at, args.sleep)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    result = train(config, vocab=vocab, source=source, mesh=mesh, progress=False)
    summary = {"step": int(jax.device_get(result.state.step)),
               "stopped_by_signal": result.stopped_by_signal,
               "history_steps": [h["step"] for h in result.history]}
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
