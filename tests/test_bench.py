"""Benchmarks report comparable numbers (values are for BENCHMARKS.md, not asserted bounds)."""

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.test_records_training import _config


def test_bench_data_reports_pipeline_and_train_rates(prepared, tmp_path):
    root, _ = prepared
    overrides = [f"tokenizers.dir={root / 'tok'}", f"data.dir={root / 'shards'}",
                 "strategy.name=parallel", "model.d_model=32", "model.num_layers=1",
                 "model.mlp_dim=64", "data.seq_len=64", "data.batch_size=2", "mesh.ici.fsdp=1"]
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "bench", "data", "--config",
         f"{REPO}/configs/tiny/spoken.yaml", *overrides, "--seconds", "0.5", "--steps", "2", "--json"],
        capture_output=True, text=True, cwd=REPO,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
             "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["peer_tokens_per_s"] > 0
    assert abs(result["ratio_vs_peer"] - result["tokens_per_s"] / result["peer_tokens_per_s"]) < 1e-6
    assert result["batch"] == [2, 2, 64]
