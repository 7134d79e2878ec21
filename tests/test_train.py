"""Training end to end on the tiny configs: convergence, gradient accumulation, exact resume
after a kill, SIGTERM, NaN, the CLI, and the vocabulary check on restore.

Tests that must interrupt a run do it in a subprocess (tests/train_worker.py) on one CPU device.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from slm.config import load_config
from slm.data.synthetic import SyntheticTokens
from slm.errors import SlmError, TrainingDivergedError
from slm.model.precision import compute_dtype
from slm.train.trainer import Trainer, train, vocab_from_config

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "train_worker.py"

# Bounds on the final loss of the tiny synthetic task after its configured 200 steps. The task is
# fully predictable (every next token follows from the previous one), so a working model drives
# the loss towards 0: today synthetic.yaml reaches ~0.003 and multistream.yaml ~0.31 (its depth
# codebooks are the slow part). The bounds leave ~10x / ~1.6x headroom for numeric drift, and sit
# far below the loss of an untrained model, so a broken model or optimizer fails.
SYNTHETIC_LOSS_BOUND = 0.05
MULTISTREAM_LOSS_BOUND = 0.5
# The first step's loss is about ln(size of each stream's ranges) (~5.3 for synthetic.yaml, ~3.9
# averaged over multistream.yaml's streams): well above this floor, so "fell below the bound"
# means the model learned something.
UNTRAINED_LOSS_FLOOR = 2.5

# A safety net against a hung subprocess, not a timing assertion: generous on a slow CI box.
HANG_GUARD_S = 300

# Most tests train synthetic.yaml for this many steps, so that their train steps are one program
# (the learning-rate schedule depends on train.steps) and compile once (see `xla_cache`).
STEPS = 40


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's runs and its subprocesses.

    Each `train` builds fresh jitted functions, so without it every run recompiles the same init
    and train step (~7 s on a small CPU). The cache stores the compiled executables themselves,
    so results are unchanged. Restored afterwards, so other test modules are unaffected.
    """
    directory = str(tmp_path_factory.mktemp("xla-cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield directory
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """One CPU platform with `devices` simulated devices, sharing this process's XLA cache."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def config_path(name: str) -> str:
    return str(REPO / "configs" / "tiny" / f"{name}.yaml")


def tiny(name: str = "synthetic", *overrides: str):
    return load_config(config_path(name), list(overrides))


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(got, want, what: str) -> None:
    got, want = leaves(got), leaves(want)
    assert got.keys() == want.keys(), f"{what}: different tree structure"
    differ = [k for k in want if got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k])]
    assert not differ, f"{what}: {len(differ)}/{len(want)} leaves differ, e.g. {differ[:5]}"


def finalized_steps(directory: Path) -> list[int]:
    """Steps orbax has finished writing (renamed from their tmp dirs), sorted."""
    return sorted(ocp.utils.checkpoint_steps(directory))


# --- subprocess helpers ----------------------------------------------------------------

class Worker:
    """tests/train_worker.py in a subprocess, training on one CPU device, output in files.

    Its platform simulates as many CPU devices as this process's (8, from conftest): XLA:CPU
    rounds differently with 1 and with 8 simulated devices, even on a one-device mesh, so runs
    compared bit for bit across processes need the same count (and it then shares compiled
    programs with this process through `xla_cache`).
    """

    def __init__(self, tmp_path: Path, name: str, config: str, *args: str):
        self.out = tmp_path / f"{name}.stdout"
        self.err = tmp_path / f"{name}.stderr"
        devices = jax.device_count()
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), config, *args, "--devices", str(devices)],
                stdout=out, stderr=err, env=subprocess_env(devices), cwd=REPO)

    def stdout(self) -> str:
        return self.out.read_text()

    def logs(self) -> str:
        return (f"--- worker exit code {self.proc.poll()}\n--- stdout\n{self.stdout()}"
                f"\n--- stderr (tail)\n{self.err.read_text()[-4000:]}")

    def wait_until(self, predicate, what: str) -> None:
        """Poll until `predicate()`; fail (with the worker's output) if the worker exits first."""
        deadline = time.monotonic() + HANG_GUARD_S
        while not predicate():
            if self.proc.poll() is not None:
                if predicate():
                    return
                pytest.fail(f"worker exited before {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {HANG_GUARD_S} s\n{self.logs()}")
            time.sleep(0.05)

    def batches_handed_out(self) -> int:
        numbers = [int(n) for n in re.findall(r"^BATCH (\d+)$", self.stdout(), re.M)]
        return max(numbers, default=0)

    def result(self) -> dict:
        lines = [line for line in self.stdout().splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, f"expected one RESULT line\n{self.logs()}"
        return json.loads(lines[0][len("RESULT "):])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# --- sources used by several tests ------------------------------------------------------

class WrappedTokens:
    """SyntheticTokens with a per-batch edit `edit(number, batch)` (number is 1-based)."""

    def __init__(self, config, edit):
        self.inner, self.edit = SyntheticTokens(config, vocab_from_config(config)), edit

    def __iter__(self):
        return self

    def __next__(self):
        number = self.inner.step + 1
        return self.edit(number, next(self.inner))

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)


def ragged_weights(number: int, batch: dict) -> dict:
    """Zero each row's weights past a row-dependent length, so rows carry different numbers of
    loss tokens and a per-microbatch mean differs from the exact token-weighted mean."""
    rows, _, seq = batch["weights"].shape
    lengths = np.random.default_rng(number).integers(1, seq + 1, size=rows)
    lengths[0] = seq  # at least one full row; row 1 (another microbatch) is short
    lengths[1] = 2
    mask = np.arange(seq)[None, None, :] < lengths[:, None, None]
    return {**batch, "weights": (batch["weights"] * mask).astype(np.float32)}


# --- 1. convergence ---------------------------------------------------------------------

@pytest.mark.parametrize("name, bound", [
    ("synthetic", SYNTHETIC_LOSS_BOUND),
    pytest.param("multistream", MULTISTREAM_LOSS_BOUND, marks=pytest.mark.slow),
])
def test_tiny_task_loss_falls_below_bound(name, bound, single_mesh):
    config = tiny(name)
    assert config.train.steps == 200
    result = train(config, mesh=single_mesh, progress=False)
    history = result.history
    assert [h["step"] for h in history] == list(range(1, 201))
    assert history[0]["loss"] > UNTRAINED_LOSS_FLOOR, "the untrained loss should be high"
    assert history[-1]["loss"] < bound, f"{name}: final loss {history[-1]['loss']:.4f} >= {bound}"
    assert all(math.isfinite(h["loss"]) for h in history)


# --- 2. gradient accumulation -------------------------------------------------------------

def test_grad_accum_matches_one_big_batch(single_mesh):
    """grad_accum=2 over the same global batch gives the parameters of grad_accum=1 (fp32),
    with rows carrying different numbers of loss tokens (so the mean must be token-weighted)."""
    params = {}
    for accum in (1, 2):
        config = tiny("synthetic", "train.steps=4", f"data.grad_accum={accum}")
        assert compute_dtype(config.model.dtype) == config.model.param_dtype == "float32"
        result = train(config, source=WrappedTokens(config, ragged_weights), mesh=single_mesh,
                       progress=False)
        params[accum] = leaves(result.state.params)
    initial = leaves(Trainer(tiny("synthetic", "train.steps=4"), mesh=single_mesh,
                             progress=False).initial_state().params)

    moved = max(np.abs(params[1][k] - initial[k]).max() for k in initial)
    assert moved > 1e-3, "training did not move the parameters; the comparison would be vacuous"
    # rtol 1e-5 as the fp32 contract; the atol covers entries that happen to pass near zero,
    # where summing in another order leaves ~1e-9 absolute (>1e-5 relative) differences. A
    # mean over microbatches instead of over tokens moves parameters by ~1e-4.
    for key, want in params[1].items():
        np.testing.assert_allclose(params[2][key], want, rtol=1e-5, atol=1e-7, err_msg=key)


# --- 3. exact resume after SIGKILL ----------------------------------------------------------

# A partial selection: frozen parameters outside the optimizer state, and LoRA dropout masks
# drawn per step, which a resumed run must draw again exactly.
FROZEN_BASE = ("model.lora.rank=4", "model.lora.dropout=0.1", "train.trainable=[lora, norms]")


@pytest.mark.parametrize("selection", [(), FROZEN_BASE], ids=["all", "lora"])
def test_resume_after_kill_is_bitwise_exact(tmp_path, single_mesh, selection):
    common = (f"train.steps={STEPS}", "checkpoint.every_steps=20", *selection)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"

    # (a) uninterrupted, with the same checkpoint policy.
    uninterrupted = train(tiny("synthetic", *common, f"checkpoint.dir={dir_a}"),
                          mesh=single_mesh, progress=False)
    assert int(uninterrupted.state.step) == STEPS
    assert finalized_steps(dir_a) == [20, 40]

    # (b) trains to step 20, saves, and blocks forever when asked for batch 23: it is certainly
    # mid-run (past one checkpoint, before the next) when it is killed.
    worker = Worker(tmp_path, "killed", config_path("synthetic"), *common,
                    f"checkpoint.dir={dir_b}", "--block-at", "23")
    try:
        worker.wait_until(lambda: 20 in finalized_steps(dir_b), "finalized checkpoint 20")
        worker.wait_until(lambda: "BLOCKED 23" in worker.stdout(), "the block at batch 23")
        assert worker.proc.poll() is None, "the worker must still be mid-run when killed"
        os.kill(worker.proc.pid, signal.SIGKILL)
    finally:
        worker.kill()
    assert worker.proc.returncode == -signal.SIGKILL
    assert finalized_steps(dir_b) == [20], worker.logs()

    # (c) resume from B with the ordinary synthetic source.
    resumed = train(tiny("synthetic", *common, f"checkpoint.dir={dir_b}"),
                    mesh=single_mesh, progress=False)
    assert [h["step"] for h in resumed.history] == list(range(21, 41))
    assert finalized_steps(dir_b) == [20, 40]
    assert_trees_equal(resumed.state.params, uninterrupted.state.params, "params")
    assert_trees_equal(resumed.state.opt_state, uninterrupted.state.opt_state, "optimizer state")
    assert int(resumed.state.step) == 40
    # The per-step losses after the resume point are the uninterrupted run's, bit for bit.
    assert ([h["loss"] for h in resumed.history]
            == [h["loss"] for h in uninterrupted.history[20:]])


# --- 4. SIGTERM ---------------------------------------------------------------------------

def test_sigterm_saves_the_last_step_and_exits_cleanly(tmp_path, single_mesh):
    steps = STEPS  # at 0.2 s a batch, ~7 s of margin after the signal is sent at batch 5
    ckpt = tmp_path / "ckpt"
    overrides = (f"train.steps={steps}", "checkpoint.every_steps=1000", f"checkpoint.dir={ckpt}")
    worker = Worker(tmp_path, "sigterm", config_path("synthetic"), *overrides, "--sleep", "0.2")
    try:
        worker.wait_until(lambda: worker.batches_handed_out() >= 5, "5 batches")
        assert finalized_steps(ckpt) == [], "no periodic checkpoint is due before step 1000"
        worker.proc.send_signal(signal.SIGTERM)
        worker.proc.wait(timeout=HANG_GUARD_S)
    finally:
        worker.kill()
    assert worker.proc.returncode == 0, worker.logs()
    result = worker.result()
    assert result["stopped_by_signal"] is True, worker.logs()
    last = result["step"]
    assert 5 <= last < steps, worker.logs()
    assert result["history_steps"] == list(range(1, last + 1)), "every run step was completed"
    assert finalized_steps(ckpt) == [last], worker.logs()

    # Restoring that checkpoint continues the run from the step after it.
    resumed = train(tiny("synthetic", *overrides), mesh=single_mesh, progress=False)
    assert resumed.stopped_by_signal is False
    assert [h["step"] for h in resumed.history] == list(range(last + 1, steps + 1))
    assert int(resumed.state.step) == steps


# --- 5. NaN --------------------------------------------------------------------------------

def test_nan_raises_and_keeps_the_last_good_checkpoint(tmp_path, single_mesh):
    ckpt = tmp_path / "ckpt"
    config = tiny("synthetic", f"train.steps={STEPS}", "checkpoint.every_steps=10",
                  f"checkpoint.dir={ckpt}")
    assert config.checkpoint.async_save is True

    def nan_at_15(number: int, batch: dict) -> dict:
        if number == 15:
            batch["weights"] = batch["weights"].copy()
            batch["weights"][0, 0, 3] = np.nan
        return batch

    with pytest.raises(TrainingDivergedError) as raised:
        train(config, source=WrappedTokens(config, nan_at_15), mesh=single_mesh, progress=False)
    message = str(raised.value)
    assert re.search(r"\bat step 15\b", message), message
    assert "step 10" in message and str(ckpt) in message, "names the last good checkpoint"
    assert finalized_steps(ckpt) == [10]

    # A new trainer on that directory, with a clean source, resumes from step 10 and trains on.
    result = train(config, mesh=single_mesh, progress=False)
    assert [h["step"] for h in result.history] == list(range(11, STEPS + 1))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert finalized_steps(ckpt)[-1] == STEPS


# --- 6. CLI --------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slm.cli", *args], capture_output=True,
                          text=True, env=subprocess_env(1), cwd=REPO, timeout=HANG_GUARD_S)


def test_cli_train_prints_final_loss():
    done = run_cli("train", "--config", "configs/tiny/synthetic.yaml", "train.steps=3")
    assert done.returncode == 0, done.stderr[-4000:]
    found = re.search(r"^step 3: loss (\S+)$", done.stdout, re.M)
    assert found, done.stdout
    assert math.isfinite(float(found.group(1)))


@pytest.mark.parametrize("typo, named", [("trian.steps=3", "trian"),
                                         ("train.stpes=3", "train.stpes")])
def test_cli_typo_exits_2_naming_the_key(typo, named):
    done = run_cli("train", "--config", "configs/tiny/synthetic.yaml", typo)
    assert done.returncode == 2, done.stderr[-4000:]
    assert f"'{named}'" in done.stderr, done.stderr
    assert done.stderr.startswith("slm train: error:"), done.stderr  # a message, not a traceback


# --- 7. vocabulary mismatch on restore ------------------------------------------------------

def test_checkpoint_refuses_another_vocabulary(tmp_path, single_mesh):
    ckpt = tmp_path / "ckpt"
    overrides = (f"checkpoint.dir={ckpt}",)
    # The trainer's own checkpointer writes the initial state (step 0) with the config's vocab.
    writer = Trainer(tiny("synthetic", *overrides), mesh=single_mesh, progress=False)
    try:
        writer.checkpointer.save(writer.initial_state(), writer.source.get_state(), force=True)
    finally:
        writer.checkpointer.close()
    assert finalized_steps(ckpt) == [0]

    other = tiny("synthetic", *overrides, "vocab.text_size=300")
    with pytest.raises(SlmError) as raised:
        train(other, mesh=single_mesh, progress=False)
    assert type(raised.value) is not SlmError, "a specific subclass (VocabError/CheckpointError)"
    message = str(raised.value)
    assert str(ckpt) in message, message
    assert "range 'text'" in message, message
    assert finalized_steps(ckpt) == [0], "the refused restore left the checkpoint alone"


# --- 8. starting a new run from another run's (or a converted model's) parameters --------------

def test_init_from_starts_at_step_zero_with_those_parameters(tmp_path, single_mesh):
    source_dir, run_dir = tmp_path / "pretrained", tmp_path / "finetune"
    # the source trains with another optimizer setting: only its parameters are read
    pretrained = train(tiny("synthetic", "train.steps=4", "optim.weight_decay=0.0",
                            f"checkpoint.dir={source_dir}"), mesh=single_mesh, progress=False)
    finetune = Trainer(tiny("synthetic", "train.steps=4", f"checkpoint.dir={run_dir}",
                            f"checkpoint.init_from={source_dir}"), mesh=single_mesh, progress=False)
    state = finetune.initial_state()
    assert int(state.step) == 0 and finetune.source.get_state() == Trainer(
        tiny("synthetic"), mesh=single_mesh, progress=False).source.get_state()
    want = leaves(pretrained.state.params)
    for name, value in leaves(state.params).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    assert all(not np.any(v) for k, v in leaves(state.opt_state).items() if "mu" in k or "nu" in k)
    finetune.checkpointer.close()

    wider = tiny("synthetic", "model.d_model=48", f"checkpoint.init_from={source_dir}")
    with pytest.raises(SlmError, match="config.yaml|model section"):
        Trainer(wider, mesh=single_mesh, progress=False).initial_state()
    with pytest.raises(SlmError, match="no checkpoint there"):
        Trainer(tiny("synthetic", f"checkpoint.init_from={tmp_path / 'none'}"), mesh=single_mesh,
                progress=False).initial_state()
    assert not (tmp_path / "none").exists(), "a mistyped path is not created"
