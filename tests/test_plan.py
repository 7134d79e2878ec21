"""`slm plan`: the train step compiled ahead of time for N devices, sized per device."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from slm.errors import ConfigError, ShardingError
from slm.parallel import rules
from slm.train.plan import format_plan, plan_train_step
from slm.train.state import abstract_model
from slm.train.trainer import vocab_from_config
from tests.conftest import REPO


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    return subprocess.run([sys.executable, "-m", "slm.cli", "plan", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


def test_plan_of_a_tiny_model_on_8_devices(tiny_config):
    config = tiny_config("multistream", "mesh.ici={data: 2, fsdp: 2, tensor: 2}",
                         "data.seq_len=128", "model.max_seq_len=128")  # one splash tile
    plan = plan_train_step(config, "v5e", 8)  # this process's 8 simulated CPU devices
    assert plan.devices == 8 and plan.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    _, shapes, _ = abstract_model(config, vocab_from_config(config))
    leaves = jax.tree.leaves(shapes)
    assert plan.params == sum(math.prod(x.shape) for x in leaves)
    total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
    # fsdp x tensor split most bytes 4 ways; vectors and odd dimensions stay whole
    assert total / 4 <= plan.param_bytes < total / 2
    assert plan.optimizer_bytes == pytest.approx(2 * plan.param_bytes, rel=0.01)  # Adam: mu, nu
    assert plan.peak_bytes >= plan.param_bytes + plan.optimizer_bytes and plan.temp_bytes > 0
    assert 0.5 < plan.flops_per_step / plan.model_flops_per_step < 2
    assert plan.fits and plan.replicated_fraction <= config.mesh.max_replicated_fraction
    text = format_plan(plan)
    for needed in ("8 x TPU v5e", "data=2, fsdp=2, tensor=2", "params", "optimizer",
                   "activations", "fits", "FLOPs/step", "replicated"):
        assert needed in text, text
    # a TPU runs splash, which these CPU devices cannot compile: they compile their own kernel;
    # the depth decoder's three codebook steps are shorter than one kernel tile
    assert (plan.attention, plan.compiled_attention, plan.depth_attention) == \
        ("splash", "blocked", "dot_product")
    assert plan.remat == config.model.remat
    # model.dtype auto: the TPU computes in bfloat16 on float32 master weights
    assert (plan.dtype, plan.param_dtype) == ("bfloat16", "float32")
    assert "precision     bfloat16 compute, float32 parameters" in text, text
    assert ("kernels       attention splash (CPU devices compile blocked in its place), depth "
            f"decoder dot_product; remat {config.model.remat}") in text, text


def test_plan_runs_the_replication_guard(tiny_config, monkeypatch):
    monkeypatch.setitem(rules.RULES, "embed", ())
    monkeypatch.setitem(rules.RULES, "vocab", ())
    with pytest.raises(ShardingError, match="replicated"):
        plan_train_step(tiny_config("multistream"), "v5p", 8)


def test_plan_names_unknown_targets_and_missing_devices(tiny_config):
    with pytest.raises(ConfigError, match="--target v4x.*v5p"):
        plan_train_step(tiny_config("synthetic"), "v4x", 8)
    with pytest.raises(ShardingError, match="fresh process"):
        plan_train_step(tiny_config("synthetic"), "h100", 16)


def test_cli_plan_creates_the_devices_it_is_asked_for():
    done = run_cli("--config", "configs/tiny/synthetic.yaml", "--devices", "4", "--target", "h100",
                   "--json", "mesh.ici={data: 2, fsdp: -1, tensor: 1}",
                   "data.seq_len=128", "model.max_seq_len=128")
    assert done.returncode == 0, done.stderr[-4000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["devices"] == 4 and plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert plan["fits"] and plan["target"]["name"] == "NVIDIA H100"
    # model.dtype auto means bfloat16 on a GPU, which cuDNN's kernel needs
    assert plan["dtype"] == "bfloat16" and plan["attention"] == "cudnn"
    assert plan["compiled_attention"] == "blocked"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e .[tpu]) to describe TPU topologies")
def test_cli_plan_compiles_for_a_tpu_topology_without_a_tpu():
    done = run_cli("--config", "configs/tiny/multistream.yaml", "--devices", "8", "--target", "v6e",
                   "--json")
    assert done.returncode == 0, done.stderr[-4000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["device_kind"] == "TPU v6e" and plan["mesh"]["fsdp"] == 8 and plan["fits"]


@pytest.mark.slow
def test_plan_7b_on_256_devices_fits_v5p():
    start = time.monotonic()
    done = run_cli("--config", "configs/pretrain/7b.yaml", "--devices", "256", "--target", "v5p",
                   "--json", timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["devices"] == 256 and plan["mesh"]["fsdp"] == 256
    assert 6e9 < plan["params"] < 9e9
    assert plan["fits"] and plan["peak_bytes"] < 95e9
    assert plan["attention"] == "splash" and plan["remat"] == "full"
    assert time.monotonic() - start < 1200, "a plan of the 7B config should take minutes"
