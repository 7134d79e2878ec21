"""`slm posttrain compare`: the methods from one SFT checkpoint, measured alike, and the
numbers it rests on (repetition, differences of accuracies, rollout throughput)."""

from __future__ import annotations

import json
import math

import pytest

from slm.eval.repetition import repeats, reply_watch
from slm.eval.spoken_qa import Answer
from slm.eval.stats import accuracy, difference
from tests.test_posttrain import run_cli, sft  # noqa: F401  (the SFT checkpoint fixture)


def test_repetition_counts_a_repeated_word_ngram():
    assert repeats("bird bird bird", 2)  # overlapping runs count
    assert not repeats("bird bird", 2) and repeats("bird bird", 1)
    assert repeats("a man small man small man", 2)
    assert not repeats("a man and a woman", 2) and repeats("a man and a woman", 1)
    assert repeats("Four four", 1)  # case does not make words differ
    assert not repeats("", 1) and not repeats("four", 2)


def _answer(text: str, steps: int) -> Answer:
    return Answer(id="q", condition="voices", question="?", voice="v", kind="fact",
                  expected="four", text_answer=text, correct=text == "four", heard=None,
                  raw_heard=None, spoken_correct=None, steps=steps, tokens=2 * steps,
                  steps_to_first_audio=1, ms_to_first_audio=None, seconds=0.1)


def test_reply_watch_reports_the_rate_with_its_interval_and_the_lengths():
    watch = reply_watch([_answer("four", 10), _answer("four four four", 20),
                         _answer("two two", 30), _answer("", 40)], n=2)
    assert watch["repetition"] == accuracy([False, True, False, False])
    assert (watch["reply_steps"], watch["reply_tokens"], watch["reply_words"]) == (25, 50, 1.5)
    assert watch["ngram"] == 2


def test_difference_has_newcombes_interval():
    """Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 - 48/80 = 0.2,
    method 10: [0.0524, 0.3339]."""
    diff = difference(accuracy([1] * 56 + [0] * 14), accuracy([1] * 48 + [0] * 32))
    assert diff["difference"] == pytest.approx(0.2)
    assert (round(diff["low"], 4), round(diff["high"], 4)) == (0.0524, 0.3339)


def test_compare_runs_every_method_from_one_checkpoint_and_fills_the_readme(sft, tmp_path):  # noqa: F811
    root, checkpoint = sft
    out = tmp_path / "compare"
    done = run_cli("posttrain", "compare", "--checkpoint", str(checkpoint),
                   "--corpus", str(root / "corpus"), "--out", str(out), "--steps", "2",
                   "--runs", "kd,grpo,kd+dpo",  # every method, and a chain
                   "--questions", "2", "--max-reply-steps", "12", "--rollout-rounds", "1",
                   "posttrain.prompts=2", "posttrain.rollout.max_steps=8", "posttrain.grpo.group=2",
                   "optim.learning_rate=0.01")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "kd -> dpo" in done.stdout  # results.md printed
    report = json.loads((out / "results.json").read_text())
    models = report["models"]
    assert list(models) == ["start", "kd", "grpo", "kd+dpo"]
    for name, model in models.items():
        conditions = model["conditions"]
        assert set(conditions) == {"voices", "text"}
        for summary in conditions.values():
            assert summary["answer"]["n"] == 2 and 0 <= summary["answer"]["low"] <= summary["answer"]["high"] <= 1
            assert summary["repetition"]["n"] == 2 and summary["reply_tokens"] > 0
        gap = model["modality_gap"]["voices"]
        assert gap["difference"] == pytest.approx(conditions["text"]["answer"]["accuracy"]
                                                  - conditions["voices"]["answer"]["accuracy"])
        assert (out / name / "answers.json").is_file()
        if name == "start":
            continue
        change = model["vs_start"]["voices"]
        assert change["difference"] == pytest.approx(
            conditions["voices"]["answer"]["accuracy"]
            - models["start"]["conditions"]["voices"]["answer"]["accuracy"])
        links = model["training"]
        assert [link["method"] for link in links] == name.split("+")
        for link in links:
            assert link["steps"] == 2 and [h["step"] for h in link["history"]] == [1, 2]
            assert all(math.isfinite(h["loss"]) for h in link["history"])
    # the chain continued from kd's own run, trained once, and its table shows that run once
    assert models["kd+dpo"]["training"][0] == models["kd"]["training"][0]
    assert (out / "kd+dpo" / "model").is_dir() and not (out / "kd+dpo" / "kd").exists()
    assert "| kd -> dpo | dpo |" in done.stdout and "| kd -> dpo | kd |" not in done.stdout
    assert "ties" in models["kd+dpo"]["training"][1]["last"]
    assert models["grpo"]["training"][0]["first"]["reward"] >= 0
    rollout = report["rollout"]
    assert rollout["batch"] == 4 and rollout["streams"] == 2  # 2 questions x group 2; parallel
    assert rollout["rollout_tokens_per_s"] > 0 and rollout["decode_tokens_per_s"] > 0
    assert rollout["rollout_vs_decode"] == pytest.approx(
        rollout["rollout_tokens_per_s"] / rollout["decode_tokens_per_s"])

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- post-training results: written by `slm results --posttrain`, "
                      "do not edit -->\nold\n<!-- end of post-training results -->\nrest\n")
    done = run_cli("results", "--ablation", "", "--posttrain", str(out), "--readme", str(readme))
    assert done.returncode == 0, done.stderr[-2000:]
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| kd -> dpo |" in text and "voices: change vs start" in text
    assert f"{rollout['rollout_tokens_per_s']:,.0f} tokens/s" in text


def test_compare_names_an_unknown_method_or_condition():
    from slm.errors import ConfigError
    from slm.posttrain.compare import chains, check_conditions

    assert chains(["kd", "kd+dpo"]) == [("kd",), ("kd", "dpo")]
    with pytest.raises(ConfigError, match="--runs 'kd\\+ppo': no post-training method 'ppo'"):
        chains(["kd+ppo"])
    check_conditions(["voices", "text", "transfer"])
    with pytest.raises(ConfigError, match="unknown: loud"):
        check_conditions(["voices", "loud"])
    with pytest.raises(ConfigError, match="at least one of them spoken"):
        check_conditions(["text"])
