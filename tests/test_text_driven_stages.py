"""Text-driven generation in two stages (the LM learns to write, then its unit decoder learns to
speak from the frozen LM: LLaMA-Omni, Freeze-Omni), and the Ω trade of streaming its replies."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slm.bench.stream import omega_trade
from slm.data.source import make_source
from slm.reply import load_speaker
from slm.speech.audio import load_audio
from slm.train.trainable import paths, split_tree
from slm.train.trainer import train, vocab_from_config
from tests.conftest import REPO, SUBPROCESS_ENV, one_device_mesh
from tests.test_records_training import _config

HEAD = ["model.head_options={ctc_units: {d_model: 32, num_heads: 2, mlp_dim: 64}}",
        "optim.warmup_steps=1"]
SPEAK = ["train.trainable=[head_kinds/ctc_units/.*]"]  # the README's second stage


@pytest.fixture(scope="module")
def stages(prepared, tmp_path_factory):
    """(root, stage-1 checkpoint and result, stage-2 checkpoint and result, stage-2 config)."""
    root, _ = prepared
    write, speak = tmp_path_factory.mktemp("write"), tmp_path_factory.mktemp("speak")
    first = train(_config(root, "text_driven", *HEAD, "strategy.options.speech_targets=false",
                          "train.steps=4", f"checkpoint.dir={write}"),
                  mesh=one_device_mesh(), progress=False)
    config = _config(root, "text_driven", *HEAD, *SPEAK, "train.steps=6",
                     f"checkpoint.init_from={write}", f"checkpoint.dir={speak}")
    second = train(config, mesh=one_device_mesh(), progress=False)
    return root, (write, first), (speak, second), config


def _model(speaker):
    return nnx.merge(speaker.sampler.graphdef, speaker.sampler.params)


def _questions(root, n):
    """(text, 16 kHz wave) of the first `n` held-out questions."""
    heldout = root / "corpus" / "heldout"
    utterances = {u["id"]: u for u in map(json.loads, (heldout / "utterances.jsonl").open())}
    dialogues = [json.loads(line) for line in (heldout / "dialogues.jsonl").open()][:n]
    return [(d["question"], load_audio(root / "corpus" / utterances[d["question_id"]]["audio"],
                                       16000)) for d in dialogues]


def test_the_second_stage_trains_the_unit_decoder_and_leaves_the_lm_exactly(stages, single_mesh):
    root, (write, first), (speak, second), config = stages
    assert all(h["loss/units"] == 0 for h in first.history)  # stage 1 writes, no unit targets
    assert all(h["loss/units"] > 0 for h in second.history)
    before, after = (load_speaker(str(d), mesh=single_mesh) for d in (write, speak))
    lm_before, lm_after = _model(before), _model(after)

    params = [nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (lm_before, lm_after)]
    (head0, rest0), (head1, rest1) = (split_tree(p, lambda path: path[0] == "head_kinds")
                                      for p in params)
    assert paths(rest0) == paths(rest1) and len(paths(rest0)) > 10
    jax.tree.map(np.testing.assert_array_equal, rest0, rest1)
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(head0), jax.tree.leaves(head1)))

    # the text channel's logits on written and spoken questions are the first stage's, bit for bit
    for text, wave in _questions(root, 3):
        for turn in (before.read(text), before.hear(wave, 16000)):
            prompt = jnp.asarray(before.prompt([turn]).tokens[None])
            text0, text1 = (m(prompt).temporal[0] for m in (lm_before, lm_after))
            np.testing.assert_array_equal(np.asarray(text0), np.asarray(text1))

    # while the unit decoder's CTC loss fell on the same batch of spoken replies
    batch = next(make_source(config, vocab_from_config(config)))
    segments = jnp.asarray(batch["segments"][:, 0]) if "segments" in batch else None
    losses = [jax.device_get(m.loss(jnp.asarray(batch["tokens"]), jnp.asarray(batch["weights"]),
                                    segments)[2]) for m in (lm_before, lm_after)]
    ctc = [m["loss_sum/units"] / m["weight_sum/units"] for m in losses]
    assert losses[0]["weight_sum/units"] > 0 and ctc[1] < ctc[0], ctc
    assert losses[0]["loss_sum/text"] == losses[1]["loss_sum/text"]


def _writing_speaker(checkpoint, mesh, max_steps):
    """A greedy speaker that keeps writing to `max_steps` (a model trained a few steps may end
    its answer at once), so every state speaks."""
    from slm.bench.strategies import endless
    from slm.sample import GREEDY, Sampler

    speaker = load_speaker(str(checkpoint), mesh=mesh, max_steps=max_steps, greedy=True)
    model = _model(speaker)
    speaker.sampler = Sampler(model, endless(speaker.strategy.policy(speaker.vocab)),
                              speaker.vocab, (GREEDY,) * len(model.streams), max_steps=max_steps)
    return speaker


def test_first_audio_comes_later_as_omega_grows_and_every_pace_is_judged(stages, single_mesh):
    from slm.eval.judge import train_judge

    root, _, (speak, _), _ = stages
    speaker = _writing_speaker(speak, single_mesh, max_steps=12)
    users = [[speaker.hear(wave, 16000)] for _, wave in _questions(root, 2)]
    judge = train_judge(root / "corpus", steps=2, limit=8)
    rows = omega_trade(speaker, users, judge, [1, 4])
    json.dumps(rows)  # the results are plain JSON

    assert [r["omega"] for r in rows] == [1, 4] and all(r["replies"] == 2 for r in rows)
    for row in rows:
        assert row["spoke"] == 2 and row["speech_cer"] >= 0 and row["ms_to_first_audio"] > 0
        for answer in row["answers"]:
            assert answer["steps"] == 12 and answer["chunks"] == 12 // row["omega"]
            assert answer["steps_to_first_audio"] % row["omega"] == 0  # only at chunk ends
    # the same replies: their text and units do not depend on the pace they are streamed at
    assert [a["text"] for a in rows[0]["answers"]] == [a["text"] for a in rows[1]["answers"]]
    # a state's units exist one step after it: with Ω = 1 the first audio comes at step 2
    assert rows[0]["steps_to_first_audio"] == 2 and rows[1]["steps_to_first_audio"] == 4


def test_slm_bench_stream_writes_its_json(stages, tmp_path):
    root, _, (speak, _), _ = stages
    (tmp_path / "corpus").symlink_to(root / "corpus")
    out = tmp_path / "stream.json"
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "bench", "stream", "--checkpoint", str(speak),
         "--root", str(tmp_path), "--omega", "2", "3", "--questions", "1", "--max-steps", "6",
         "--judge-steps", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=SUBPROCESS_ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["strategy"] == "text_driven" and result["questions"] == 1
    assert [row["omega"] for row in result["omegas"]] == [2, 3]
    assert "speech CER" in done.stdout and (tmp_path / "judge" / "judge.json").is_file()
    from slm.bench.report import markdown

    table = markdown([result])  # BENCHMARKS.md renders it
    assert "## Streaming pace" in table and "| 2 |" in table and "| 3 |" in table
