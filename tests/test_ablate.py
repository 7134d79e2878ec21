"""`slm ablate` end to end at test size: every strategy trained alike, scored, reported."""

import json
import shutil
import subprocess
import sys

import pytest

from slm.ablate import HEADLINE, load_ablation
from slm.errors import ConfigError
from tests.conftest import REPO, SUBPROCESS_ENV, TINY_RUN

STRATEGIES = ["chain_of_modality", "interleaved", "parallel", "coarse_to_fine"]


def test_ablation_reports_every_strategy_with_every_metric(tiny_ablation):
    out, done = tiny_ablation
    report = json.loads((out / "results.json").read_text())
    assert list(report["strategies"]) == STRATEGIES
    for name, result in report["strategies"].items():
        assert set(HEADLINE) <= set(result), name
        assert 0.0 <= result["answer_accuracy"] <= 1.0 and result["speech_cer"] >= 0.0
        assert result["params"] > 0 and result["train_tokens_per_s"] > 0
        assert result["decode_tokens_per_s"] > 0 and result["final_loss"] > 0
        assert (out / name / "model").is_dir() and (out / name / "answers.json").is_file()
    # the layouts decide the latency: parallel speaks at once, the chain only after its text
    chain, parallel = report["strategies"]["chain_of_modality"], report["strategies"]["parallel"]
    if chain["steps_to_first_audio"] is not None and parallel["steps_to_first_audio"] is not None:
        assert parallel["steps_to_first_audio"] < chain["steps_to_first_audio"]
    for plot in ("loss_curves.png", "accuracy_vs_latency.png"):
        assert (out / plot).stat().st_size > 1000, plot
    assert "| parallel |" in (out / "results.md").read_text() and "| parallel |" in done.stdout


def test_rerun_reuses_every_stage(tiny_ablation, tmp_path):
    out = tmp_path / "out"  # a copy: a subset run rewrites results.json, which others read
    shutil.copytree(tiny_ablation[0], out)
    config = tmp_path / "ablation.yaml"
    config.write_text(f"base: {REPO}/configs/tiny/spoken.yaml\n"
                      "strategies: {parallel: {}}\n"
                      "questions: 2\nmax_reply_steps: 24\njudge_steps: 4\n")
    command = [sys.executable, "-m", "slm.cli", "ablate", "--config", str(config), "--out", str(out),
               *TINY_RUN]
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=SUBPROCESS_ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stderr and "asking" not in again.stderr
    # a kept run with another step budget is not passed off as this one
    longer = subprocess.run([*command, "train.steps=8"], capture_output=True, text=True, cwd=REPO,
                            env=SUBPROCESS_ENV)
    assert longer.returncode != 0 and "train.steps=8" in longer.stderr, longer.stderr[-3000:]


@pytest.mark.parametrize("text, message", [
    ("strategies: {parallel: {}}\n", "'base' and 'strategies' required"),
    ("base: x.yaml\nstrategies: {parallel: {}}\nquestion: 3\n", "question"),
    ("base: x.yaml\nstrategies: [parallel]\n", "'strategies' must be a dict"),
])
def test_bad_ablation_config_names_the_field(tmp_path, text, message):
    path = tmp_path / "ablation.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_ablation(path)

