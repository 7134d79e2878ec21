"""Benchmarks report comparable numbers (values are for BENCHMARKS.md, not asserted bounds)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


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


# --- train and decode against the transformers peer; BENCHMARKS.md -------------------------

TINY_LLAMA = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
              "model.mlp_dim=64", "model.max_seq_len=32", "vocab.text_size=107",
              "data.batch_size=2", "data.seq_len=16"]
TINY_STRATEGIES = """
vocab: {text_size: 40, num_units: 16, num_codebooks: 2, codebook_size: 8}
model: {d_model: 32, num_layers: 1, num_heads: 2, num_kv_heads: 2, mlp_dim: 64, max_seq_len: 96,
        depth: {num_layers: 1, d_model: 16, num_heads: 2, num_kv_heads: 2, mlp_dim: 32}}
"""


def _bench_cli(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "bench", *args, "--vs", "hf", "--rounds", "1", "--json"],
        capture_output=True, text=True, cwd=REPO,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
             "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compared(result: dict) -> None:
    assert result["tokens_per_s"] > 0 and result["peer_tokens_per_s"] > 0
    assert abs(result["ratio_vs_peer"] - result["tokens_per_s"] / result["peer_tokens_per_s"]) < 1e-6


@pytest.fixture(scope="module")
def train_result():
    return _bench_cli("train", *TINY_LLAMA, "--steps", "1")


@pytest.fixture(scope="module")
def decode_result(tmp_path_factory):
    strategies = tmp_path_factory.mktemp("bench") / "strategies.yaml"
    strategies.write_text(TINY_STRATEGIES)
    return _bench_cli("decode", *TINY_LLAMA, "--batch", "1", "2", "--prompt-len", "4",
                      "--new-tokens", "8", "--strategies-config", str(strategies))


def test_bench_train_reports_rate_mfu_and_peer(train_result):
    _compared(train_result)
    assert 0 < train_result["mfu"] < 1.5 and train_result["matmul_peak_flops"] > 1e8
    peaks = train_result["matmul_peaks"]  # the machine's peak is the best library's
    assert set(peaks) == {"jax", "torch", "numpy"}
    assert train_result["matmul_peak_flops"] == max(peaks.values())
    assert train_result["batch"] == [2, 1, 16] and train_result["params"] > 0
    assert train_result["machine"]["cores"] >= 1 and "jax" in train_result["machine"]["versions"]


def test_bench_decode_reports_batches_roofline_and_strategies(decode_result):
    _compared(decode_result)
    assert set(decode_result["batches"]) == {"1", "2"}
    for run in decode_result["batches"].values():
        _compared(run)
        assert 0 < run["roofline_fraction"] < 2 and 0 < run["roofline_fraction_best"] < 2
        assert run["memory_bandwidth"] > 1e8
        # post-training's rollout of the same replies: the same sampler plus its log-prob pass
        assert run["rollout_tokens_per_s"] > 0
        assert run["rollout_vs_decode"] == pytest.approx(run["rollout_tokens_per_s"]
                                                         / run["tokens_per_s"])
    assert decode_result["roofline_fraction"] == decode_result["batches"]["1"]["roofline_fraction"]
    strategies = decode_result["strategies"]
    assert set(strategies) == {"interleaved", "chain_of_modality", "parallel", "coarse_to_fine",
                               "text_driven"}
    # reply steps before the first audio, as each layout of the same exchange puts them
    assert strategies["parallel"]["steps_to_first_audio"] == 1
    assert strategies["coarse_to_fine"]["steps_to_first_audio"] == 1
    assert strategies["text_driven"]["steps_to_first_audio"] == 1  # the first token's units
    assert strategies["chain_of_modality"]["steps_to_first_audio"] > 1
    assert all(s["ms_to_first_audio"] > 0 and s["tokens_per_s"] > 0 for s in strategies.values())
    # first sound: first audio plus the codec's decoding of the first frames
    assert all(s["codec_ms"] > 0 and s["ms_to_first_sound"] == pytest.approx(
        s["ms_to_first_audio"] + s["codec_ms"]) for s in strategies.values())


def test_benchmarks_md_is_generated_from_the_json(train_result, decode_result, tmp_path):
    paths = []
    for name, result in (("train", train_result), ("decode", decode_result)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, "-m", "slm.cli", "bench", "report", *map(str, paths),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "## Train step" in text and "## Decode" in text and "causal attention" in text
    assert train_result["machine"]["cpu"] in text
    assert f"{train_result['ratio_vs_peer']:,.2f}" in text
    assert "| coarse_to_fine |" in text
    assert "rollout / slm" in text


def test_train_flops_count_causal_attention_half():
    from slm.bench.train import train_flops_per_token
    from slm.config import ModelConfig

    model = ModelConfig(d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=16)
    per_layer = 2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16  # q and o, k and v (GQA), gate/up/down
    matmul = 2 * per_layer + 8 * 100  # + a head over 100 ids
    assert train_flops_per_token(model, 100, 32) == 6 * matmul + 6 * 2 * 32 * 8


@pytest.mark.slow
def test_bench_hearing_times_cached_states_against_the_in_model_encoder(tmp_path):
    from tests.conftest import SUBPROCESS_ENV, TINY_RUN

    overrides = [o for o in TINY_RUN if not o.startswith(("train.steps", "checkpoint."))]
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "bench", "hearing", "--out", str(tmp_path), "--json",
         "--steps", "1", "--rounds", "1", *overrides, "model.speech_input.projector_options={k: 2}"],
        capture_output=True, text=True, cwd=REPO, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    variants = result["variants"]
    assert set(variants) == {"cached states", "encoder in the model, trained",
                             "encoder in the model, frozen"}
    assert variants["cached states"]["vs_cached"] == 1.0
    assert all(v["step_seconds"] > 0 for v in variants.values())
    # the same dialogues in the same layout: only the frames' width differs
    cached, in_model, _ = (v["features_batch"] for v in variants.values())
    assert cached[:3] == in_model[:3] and in_model[3] == 80


def test_bench_lora_compares_optimizer_state_and_step_time(tmp_path):
    from slm.bench.report import markdown, summary

    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "bench", "lora", "--config",
         f"{REPO}/configs/tiny/synthetic.yaml", "--rank", "4", "--steps", "1", "--rounds", "1",
         "--json"], capture_output=True, text=True, cwd=REPO,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
             "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    full, lora = result["full"], result["lora"]
    assert full["trained_params"] == full["params"] < lora["params"]
    assert lora["trained_params"] == lora["params"] - full["params"], "the adapters alone train"
    assert 0 < lora["optimizer_bytes"] < 0.2 * full["optimizer_bytes"]
    assert full["step_seconds"] > 0 and lora["step_seconds"] > 0
    assert "## Full fine-tuning vs LoRA" in markdown([result])
    assert summary(result).startswith("lora: optimizer state")


# --- the accelerator script, on its tiny path ------------------------------------------------

@pytest.mark.slow
def test_gpu_bench_script_runs_its_tiny_path_on_cpu(tmp_path):
    """launch/gpu_bench.sh with SLM_BENCH_TINY=1: every command of the GPU run, on a tiny model."""
    done = subprocess.run(
        ["bash", f"{REPO}/launch/gpu_bench.sh", str(tmp_path)], capture_output=True, text=True,
        cwd=REPO, timeout=1200,
        env={"SLM_BENCH_TINY": "1", "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-4000:]
    train = json.loads((tmp_path / "train.json").read_text())
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"]
    assert train["dtype"] == "float32"  # model.dtype auto on a CPU
    assert train["vendor_peak_flops"] is None and train["mfu_vs_vendor"] is None  # no datasheet
    assert set(decode["batches"]) == {"1", "16"}
    assert all(0 < x["roofline_fraction"] for x in decode["batches"].values())
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Train step" in report and "## Decode" in report
    assert f"backend cpu ({train['machine']['device']})" in report


def test_vendor_peak_is_known_for_h100_and_h200_only():
    from slm.bench.machine import vendor_peak_flops

    assert vendor_peak_flops("NVIDIA H100 80GB HBM3") == vendor_peak_flops("NVIDIA H200") == 989e12
    assert vendor_peak_flops("cpu") is None and vendor_peak_flops("TPU v5p") is None
