"""`slm ablate` end to end at test size: every strategy trained alike, scored, reported."""

import json
import shutil
import subprocess
import sys

import pytest

from slm.ablate import load_ablation
from slm.eval.tables import HEADLINE
from slm.errors import ConfigError
from tests.conftest import REPO, SUBPROCESS_ENV, TINY_RUN

STRATEGIES = ["chain_of_modality", "interleaved", "parallel", "coarse_to_fine", "text_driven"]


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



def test_readme_block_is_written_from_results(tiny_ablation, tmp_path):
    from slm.eval.tables import README_BEGIN, README_END, fill_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_BEGIN}\nold numbers\n{README_END}\n\nafter\n")
    fill_readme(readme, json.loads((tiny_ablation[0] / "results.json").read_text()))
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("after\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:1 + len(STRATEGIES)]] == [f"| {n}" for n in STRATEGIES]
    assert "perturbed (6 pooled)" in rows[0] and "Judge CER" in text and len(rows) == 2 * (1 + len(STRATEGIES))


def test_units_vs_features_block_pairs_each_strategy(tiny_ablation, tmp_path):
    from slm.eval.tables import FEATURES_BEGIN, FEATURES_END, README_BEGIN, README_END, fill_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n{FEATURES_BEGIN}\nold\n{FEATURES_END}\n")
    report = json.loads((tiny_ablation[0] / "results.json").read_text())
    fill_readme(readme, report, features=report)
    block = readme.read_text().split(FEATURES_BEGIN)[1]
    rows = [line.split(" | ")[:2] for line in block.splitlines() if line.startswith("| ")][1:]
    assert rows == [[f"| {n}", label] for n in STRATEGIES for label in ("units", "features")]
    assert "old" not in block and "encoder frames" in block


FLOOR_RUN = ["train.steps=300", "model.d_model=64", "model.num_layers=2", "model.mlp_dim=128",
             "data.batch_size=8", "data.seq_len=128", "checkpoint.every_steps=300",
             "optim.learning_rate=0.003", "corpus.train_sentences=30", "corpus.train_dialogues=20",
             "corpus.heldout_sentences=4", "corpus.heldout_dialogues=40", "corpus.text_lines=50",
             "corpus.text_dialogues=600", "tokenizers.num_units=16", "tokenizers.codebook_size=32",
             "tokenizers.unit_encoder_steps=4", "tokenizers.unit_vocoder_steps=4"]


def test_benchmark_floors_a_trained_model_beats_its_controls(tmp_path):
    """A small model trained on written dialogues answers written questions well above chance,
    while the controls (no question to hear) stay at chance: the scorer cannot flatter, and a
    regression in training or scoring that lifts a control or sinks the text channel fails."""
    config = tmp_path / "ablation.yaml"
    config.write_text(f"base: {REPO}/configs/tiny/spoken.yaml\n"
                      "common: {data: {mixture: {text_dialogue: 1.0}}}\n"
                      "strategies: {parallel: {}}\n"
                      "conditions: [voices, text, silence, shuffled]\n"
                      "questions: 40\ntimed_questions: 2\nmax_reply_steps: 24\njudge_steps: 4\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "slm.cli", "ablate", "--config", str(config),
                           "--out", str(out), *FLOOR_RUN], capture_output=True, text=True, cwd=REPO,
                          env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    c = json.loads((out / "results.json").read_text())["strategies"]["parallel"]["conditions"]
    chance = c["text"]["chance"]["majority"]
    assert c["text"]["answer"]["n"] == 40
    assert c["text"]["answer"]["low"] > chance + 0.1, (c["text"]["answer"], chance)
    for control in ("silence", "shuffled"):
        assert c[control]["answer"]["accuracy"] <= c[control]["chance"]["majority"] + 0.15, control
        assert c[control]["answer"]["accuracy"] < c["text"]["answer"]["accuracy"] - 0.2, control


def test_demo_loss_text_says_where_held_out_loss_levels_off():
    from slm.eval.tables import demo_loss_text

    def history(held_out):
        return [{"step": 100 * (i + 1), "loss": 10.0 ** -i, "eval/dialogue/loss": h}
                for i, h in enumerate(held_out)]

    memorizing = demo_loss_text(history([1.0, 0.3, 0.1, 0.12, 0.15]), "parallel")
    assert "levels off by step 300" in memorizing and "ends higher (0.15 at step 500)" in memorizing
    assert "memorizes" in memorizing
    learning = demo_loss_text(history([1.0, 0.5, 0.3, 0.2, 0.15]), "parallel")
    assert "levels off by step 300" in learning and "memorizes" not in learning


def test_a_strategy_stopped_by_sigterm_is_not_recorded_as_trained(tmp_path, monkeypatch):
    """A preempted run saves its checkpoint and returns; the ablation must not then evaluate
    the half-trained model as finished (a resumed ablation once reported a 62-step model)."""
    from slm import ablate
    from slm.config import Config
    from slm.errors import TrainingInterrupted
    from slm.train import trainer

    monkeypatch.setattr(trainer, "train", lambda config: trainer.TrainResult(
        state=None, plan=None, history=[{"step": 1, "loss": 5.0, "time": 0.0}],
        stopped_by_signal=True))
    with pytest.raises(TrainingInterrupted, match="run the same command again"):
        ablate._train(Config(), tmp_path)
    assert not (tmp_path / "train.json").exists()
