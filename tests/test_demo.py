"""`slm demo` end to end on CPU: data, tokenizers, training, held-out spoken questions, outputs."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, SUBPROCESS_ENV, TINY_RUN


@pytest.mark.skipif(not os.path.exists("/usr/bin/espeak-ng"), reason="needs espeak-ng")
def test_demo_writes_reply_picture_and_report_and_reuses_its_work(tmp_path):
    env = SUBPROCESS_ENV
    command = [sys.executable, "-m", "slm.cli", "demo", "--out", str(tmp_path), "--questions", "2",
               "--judge-steps", "4", *TINY_RUN]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("question.wav", "reply.png", "report.md", "report.json"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["questions"] == 2 and report["answer"]["n"] == 2
    low, high = report["spoken"]["low"], report["spoken"]["high"]
    assert low <= report["spoken"]["accuracy"] <= high and report["speech_cer"] >= 0.0
    assert set(report["judge"]) == {"heldout_voices", "assistant_voice"}
    assert "95% Wilson intervals" in (tmp_path / "report.md").read_text()
    assert {"question", "voice", "expected", "text_answer", "correct", "heard",
            "spoken_correct"} <= set(report["results"][0])
    assert "held-out spoken questions" in first.stdout
    # a second run reuses the corpus, tokenizers, shards and model
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[demo] fitting" not in again.stderr and "already trained" in again.stderr
    assert "training the judge" not in again.stderr
