"""The multi-controller path for real: launch/local_multiprocess.sh starts 2 processes x 4 CPU
devices joined by a coordinator on 127.0.0.1, and they must train like 1 process x 8 devices,
save together, resume together, and stop together when only one of them gets SIGTERM.

The launched processes' per-step losses come from the TensorBoard events process 0 writes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from slm.config import load_config
from slm.errors import ConfigError
from slm.parallel.distributed import host_batch_shard, job_from_env
from slm.parallel.mesh import make_mesh
from slm.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "local_multiprocess.sh"
CONFIG = str(REPO / "configs" / "tiny" / "synthetic.yaml")
HANG_GUARD_S = 600  # a safety net against a hung launch, not a timing assertion


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    """Compiled programs shared by this module's launches (a resume then compiles nothing)."""
    return tmp_path_factory.mktemp("xla-cache")


def launch(tmp_path: Path, cache: Path, name: str, *overrides: str) -> subprocess.Popen:
    """2 x 4 `slm train` on CONFIG, its output in tmp_path/NAME.launch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "SLM_"))}
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    with open(tmp_path / f"{name}.launch", "w") as out:
        return subprocess.Popen(
            [str(LAUNCH), "-n", "2", "-d", "4", "-l", str(tmp_path / name), "--", "--config",
             CONFIG, *overrides], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait(proc: subprocess.Popen, tmp_path: Path, name: str) -> str:
    """The launch's output once it has exited (stopped, with its processes, if it hangs)."""
    try:
        proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the launcher passes it on to its processes
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return (tmp_path / f"{name}.launch").read_text()


def run(tmp_path: Path, cache: Path, name: str, *overrides: str) -> str:
    output = wait(launch(tmp_path, cache, name, *overrides), tmp_path, name)
    assert "all 2 processes finished" in output, f"launch {name} failed:\n{output[-6000:]}"
    return output


def tb_losses(directory: Path) -> dict[int, float]:
    """step -> `loss` from every TensorBoard event file in `directory` (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    losses = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[event.step] = value.simple_value
    return losses


def steps_in(directory: Path) -> list[int]:
    return sorted(ocp.utils.checkpoint_steps(directory))


COMMON = ("train.steps=4", "train.log_every=1", "checkpoint.every_steps=2")


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, xla_cache):
    """(directory, launch output, per-step losses) of a 2 x 4 run: 4 steps, saves at 2 and 4."""
    root = tmp_path_factory.mktemp("two-hosts")
    output = run(root, xla_cache, "first", *COMMON, f"checkpoint.dir={root / 'ckpt'}")
    return root, output, tb_losses(root / "ckpt" / "tb")


def test_two_hosts_train_like_one_and_save_per_host(two_hosts):
    root, output, got = two_hosts
    assert f"logs in {root / 'first'}" in output, output
    assert re.search(r"^step 4: loss ", output, re.M), output
    assert steps_in(root / "ckpt") == [2, 4]
    data_files = sorted(p.name for p in (root / "ckpt" / "4" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], "one data position per host"

    reference = train(load_config(CONFIG, list(COMMON[:2])), progress=False)  # 1 x 8 devices
    assert jax.device_count() == 8
    want = {h["step"]: np.float32(h["loss"]) for h in reference.history}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)


@pytest.mark.slow
def test_two_hosts_resume_exactly(two_hosts, xla_cache):
    """Lose step 4, as after a crash: both hosts restore step 2 and redo steps 3 and 4 exactly."""
    root, _, first = two_hosts
    shutil.rmtree(root / "ckpt" / "4")
    shutil.rmtree(root / "ckpt" / "tb")
    output = run(root, xla_cache, "resumed", *COMMON, f"checkpoint.dir={root / 'ckpt'}")
    resumed = tb_losses(root / "ckpt" / "tb")
    assert sorted(resumed) == [3, 4], output
    assert [resumed[3], resumed[4]] == [first[3], first[4]], "the resumed run differs from the first"
    assert steps_in(root / "ckpt") == [2, 4]


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_at_one_saved_step(tmp_path, xla_cache):
    ckpt = tmp_path / "ckpt"
    proc = launch(tmp_path, xla_cache, "sigterm", "train.steps=100000", "checkpoint.every_steps=5",
                  f"checkpoint.dir={ckpt}")
    log = tmp_path / "sigterm.launch"
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not (ckpt.exists() and 5 in steps_in(ckpt)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint 5"
            time.sleep(0.2)
        pid = int(re.search(r"process 1 pid (\d+)", log.read_text()).group(1))
        os.kill(pid, signal.SIGTERM)  # host 1 only
    finally:
        output = wait(proc, tmp_path, "sigterm")
    assert proc.returncode == 0, output
    stopped = int(re.search(r"SIGTERM: saved step (\d+), exiting",
                            (tmp_path / "sigterm" / "process_0.err").read_text()).group(1))
    assert 5 < stopped < 100000
    assert steps_in(ckpt)[-1] == stopped
    assert re.search(rf"^step {stopped}: loss ", output, re.M), output


def test_launch_fails_loudly_when_a_process_fails(tmp_path, xla_cache):
    proc = launch(tmp_path, xla_cache, "typo", "trian.steps=3")
    output = wait(proc, tmp_path, "typo")
    assert proc.returncode == 2, output
    assert "failed with exit code 2" in output and "'trian'" in output, output


# --- the pieces, in this process --------------------------------------------------------

def test_job_from_env(monkeypatch):
    for name in ("SLM_COORDINATOR", "SLM_NUM_PROCESSES", "SLM_PROCESS_ID", "SLM_DISTRIBUTED",
                 "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    assert job_from_env() is None
    monkeypatch.setenv("SLM_DISTRIBUTED", "yes")
    with pytest.raises(ConfigError, match="SLM_DISTRIBUTED"):
        job_from_env()
    monkeypatch.setenv("SLM_DISTRIBUTED", "auto")
    assert job_from_env() == {}
    monkeypatch.setenv("SLM_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(ConfigError, match="SLM_NUM_PROCESSES"):
        job_from_env()
    monkeypatch.setenv("SLM_NUM_PROCESSES", "4")
    monkeypatch.setenv("SLM_PROCESS_ID", "3")
    assert job_from_env() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                              "process_id": 3}
    monkeypatch.setenv("SLM_DISTRIBUTED", "off")
    assert job_from_env() is None
    monkeypatch.delenv("SLM_DISTRIBUTED")
    monkeypatch.delenv("SLM_COORDINATOR")
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16",
             "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert job_from_env() == {"cluster_detection_method": "slurm"}
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task step is one process
    assert job_from_env() is None


def test_one_process_reads_the_whole_batch():
    mesh = make_mesh(load_config(CONFIG).mesh)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    assert host_batch_shard(sharding, 8) == (0, 1)
