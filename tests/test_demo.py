"""`slm demo` end to end on CPU: data, tokenizers, training, held-out spoken questions, outputs."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = ["train.steps=4", "model.d_model=32", "model.num_layers=1", "model.mlp_dim=64",
        "data.batch_size=2", "data.seq_len=128", "checkpoint.every_steps=2",
        "corpus.train_sentences=30", "corpus.train_dialogues=20", "corpus.heldout_sentences=4",
        "corpus.heldout_dialogues=4", "corpus.text_lines=50", "tokenizers.num_units=16",
        "tokenizers.codebook_size=32"]


@pytest.mark.skipif(not os.path.exists("/usr/bin/espeak-ng"), reason="needs espeak-ng")
def test_demo_writes_reply_picture_and_report_and_reuses_its_work(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "slm.cli", "demo", "--out", str(tmp_path), "--questions", "2",
               *TINY]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("question.wav", "reply.png", "report.md", "report.json"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["questions"] == 2 and 0.0 <= report["answer_accuracy"] <= 1.0
    assert {"question", "voice", "expected", "text_answer", "correct"} <= set(report["results"][0])
    assert "held-out spoken questions" in first.stdout
    # a second run reuses the corpus, tokenizers, shards and model
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[demo] fitting" not in again.stderr and "already trained" in again.stderr
