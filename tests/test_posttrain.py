"""Post-training (slm.posttrain): the losses against closed forms, rollout log-probs against
the model's own step-by-step decoding, each method through `slm posttrain`, exact resume,
and GRPO raising a toy rule reward.

Every run starts from a `parallel` model trained a few steps on the tiny synthesized corpus.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slm.errors import ConfigError
from slm.model import to_local
from slm.posttrain.distill import shared_ids, token_kl
from slm.posttrain.dpo import dpo_losses, rank_pairs
from slm.posttrain.grpo import clipped_surrogate, group_advantages, grpo_loss_sum, k3_kl
from slm.posttrain.rewards import register_reward, REWARDS
from slm.posttrain.trainer import PostTrainer, posttrain
from slm.sample import left_pad
from slm.train.trainer import train, vocab_from_config
from slm.vocab import Vocab
from tests.conftest import REPO
from tests.test_records_training import _config
from tests.test_train import assert_trees_equal, finalized_steps, subprocess_env, xla_cache  # noqa: F401

HANG_GUARD_S = 600


# --- losses on hand-made tensors ------------------------------------------------------------

def test_dpo_loss_is_log_two_at_the_reference_and_its_closed_form_elsewhere():
    same = jnp.array([-3.0, -7.5])
    losses, margin = dpo_losses(same, same - 2.0, same, same - 2.0, beta=0.1)
    np.testing.assert_allclose(losses, [math.log(2)] * 2, rtol=1e-6)
    np.testing.assert_array_equal(margin, [0.0, 0.0])
    # margin = 0.5 * ((-3 - -4) - (-5 - -4)) = 1, loss = log(1 + e^-1)
    losses, margin = dpo_losses(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]),
                                jnp.array([-4.0]), beta=0.5)
    np.testing.assert_allclose(margin, [1.0], rtol=1e-6)
    np.testing.assert_allclose(losses, [math.log1p(math.exp(-1.0))], rtol=1e-6)


def test_pairs_are_ranked_by_reward_and_ties_weigh_nothing():
    chosen, rejected, weight = rank_pairs(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_array_equal(chosen[:2], [0, 3])
    np.testing.assert_array_equal(rejected[:2], [1, 2])
    np.testing.assert_array_equal(weight, [1, 1, 0, 0])


def test_grpo_advantages_are_normalised_within_each_group():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards)
    np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv[:2].std(axis=1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(adv[2], 0.0)  # all alike: no signal
    assert adv[1, 3] > 0 > adv[1, 0]


def test_k3_kl_and_the_clipped_ratio_by_hand():
    logp = jnp.log(jnp.array([0.5, 0.1]))
    np.testing.assert_array_equal(k3_kl(logp, logp), [0.0, 0.0])
    # d = log(0.25 / 0.5): e^d - d - 1 = 0.5 + log 2 - 1
    np.testing.assert_allclose(k3_kl(jnp.log(0.5), jnp.log(0.25)), 0.5 + math.log(2) - 1, rtol=1e-6)
    old = jnp.log(jnp.array([1.0, 1.0]))
    ratio_15 = jnp.log(jnp.array([1.5, 1.5]))
    np.testing.assert_allclose(clipped_surrogate(ratio_15, old, jnp.array([1.0, -1.0]), 0.2),
                               [-1.2, 1.5], rtol=1e-6)


def test_grpo_normalisation_by_token_or_by_sequence():
    per_token = jnp.array([[[1.0, 2.0, 3.0]], [[4.0, 0.0, 0.0]]])
    mask = jnp.array([[[1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]]])
    total, weight = grpo_loss_sum(per_token, mask, "token")
    assert (float(total), float(weight)) == (10.0, 4.0)
    total, weight = grpo_loss_sum(per_token, mask, "sequence")
    assert (float(total), float(weight)) == (2.0 + 4.0, 2.0)


def test_token_kl_is_zero_for_identical_distributions_and_matches_by_hand():
    logp = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (3, 5, 7)))
    for direction in ("forward", "reverse"):
        np.testing.assert_allclose(token_kl(logp, logp, direction), 0.0, atol=1e-6)
    teacher, student = jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.25, 0.75]))
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    np.testing.assert_allclose(token_kl(student, teacher, "forward"), forward, rtol=1e-5)
    np.testing.assert_allclose(token_kl(student, teacher, "reverse"), reverse, rtol=1e-5)


def test_vocabularies_meet_on_specials_and_same_sized_ranges():
    student = Vocab.build(text_size=10, num_units=5, num_codebooks=1, codebook_size=4)
    teacher = Vocab.build(text_size=10, extra_specials=["<x>"])
    ids = shared_ids(student, teacher, "test")
    text_s, text_t = student.range("text"), teacher.range("text")
    np.testing.assert_array_equal(ids[text_s.start:text_s.stop], np.arange(text_t.start, text_t.stop))
    assert ids[student.eos_id] == teacher.eos_id
    assert np.all(ids[student.range("units").start:student.range("units").stop] == -1)
    assert np.all(ids[student.range("ac0").start:student.range("ac0").stop] == -1)


# --- runs on the tiny corpus ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft(prepared, tmp_path_factory):
    """A `parallel` model trained a few steps: what every post-training run starts from."""
    from tests.conftest import one_device_mesh

    root, _ = prepared
    directory = tmp_path_factory.mktemp("sft")
    train(_config(root, "parallel", "train.steps=4", f"checkpoint.dir={directory}"),
          mesh=one_device_mesh(), progress=False)
    return root, directory


def _posttrain_args(sft, *extra: str) -> list[str]:
    directory = sft[1]
    return [f"checkpoint.init_from={directory}", f"posttrain.kd.teacher={directory}",
            "posttrain.prompts=2", "posttrain.rollout.max_steps=8", "posttrain.grpo.group=2",
            "train.steps=2", "optim.warmup_steps=0", *extra]


def _cli_args(sft, *extra: str) -> list[str]:
    """`_config`'s tiny parallel model as command-line overrides of configs/tiny/spoken.yaml."""
    root = sft[0]
    return ["strategy.name=parallel", f"tokenizers.dir={root / 'tok'}", f"data.dir={root / 'shards'}",
            "model.d_model=32", "model.num_layers=1", "model.mlp_dim=64", "data.seq_len=128",
            "data.batch_size=4", *_posttrain_args(sft, *extra)]


def _post_config(sft, *extra: str):
    return _config(sft[0], "parallel", *_posttrain_args(sft, *extra))


TOY_REWARD = "toy_low_text"


@pytest.fixture
def toy_reward(sft):
    """`posttrain.reward=toy_low_text`: 1 when the reply's first text token is in the lower half
    of the text range. A rule a few GRPO steps can learn, unlike the answer check, which a
    barely trained model never passes (every group alike: no advantage anywhere)."""
    text = vocab_from_config(_post_config(sft)).range("text")

    def low_text_first(replied) -> float:
        first = replied.tokens[0, 0] if replied.tokens.shape[1] else -1
        return float(text.start <= first < text.start + text.size // 2)

    register_reward(TOY_REWARD, low_text_first)
    yield f"posttrain.reward={TOY_REWARD}"
    REWARDS.unregister(TOY_REWARD)


def test_rollout_logprobs_equal_the_models_own_step_by_step_decoding(sft, single_mesh):
    trainer = PostTrainer(_post_config(sft), "grpo", mesh=single_mesh, progress=False)
    setup = trainer.setup
    grids = [p.grid for p in setup.prompts.batch(1)] * 2
    rolled = setup.rollout(setup.reference, grids, jax.random.key(3))
    model = trainer.plan.model(setup.reference)
    prompt_bkt, start_b = left_pad([g.tokens for g in grids])
    p, s = prompt_bkt.shape[2], rolled.reply_steps
    reply = np.asarray(rolled.tokens[:, :, p:])
    state = model.init_decode_state(len(grids), p + s, start_b=jnp.asarray(start_b))
    _, logits, state = model.decode(jnp.asarray(prompt_bkt), state)
    want = np.zeros(reply.shape, np.float32)
    for t in range(s):  # the reply fed back one step at a time through the cache, as sampled
        for i, k in enumerate(model.temporal_index):
            logp = jax.nn.log_softmax(logits[i][:, -1])
            local = jnp.maximum(to_local(jnp.asarray(reply[:, k, t]), model.streams[k].spans), 0)
            want[:, k, t] = np.asarray(jnp.take_along_axis(logp, local[:, None], axis=1)[:, 0])
        _, logits, state = model.decode(jnp.asarray(reply[:, :, t:t + 1]), state)
    mask = np.asarray(rolled.mask)
    assert mask[:, :, :p - 1].sum() == 0, "prompt tokens are never the policy's"
    drawn = mask[:, :, p - 1:] > 0
    assert drawn.sum() > 0
    assert not drawn[:, 1, 0].any(), "the delayed speech stream's first fill was not drawn"
    for b, length in enumerate(np.asarray(rolled.length)):
        assert not drawn[b, :, length:].any(), "nothing is drawn after a reply ended"
    got = np.asarray(rolled.logp[:, :, p - 1:])
    np.testing.assert_allclose(np.where(drawn, got, 0.0), np.where(drawn, want, 0.0), atol=2e-4)
    assert np.all(got[drawn] < 0)


def test_kd_loss_is_zero_when_the_student_is_the_teacher_reading_the_same_input(sft, single_mesh):
    """The teacher is the student's own checkpoint; fed the teacher's input (the written
    question, then the student's reply), the student's distribution at every reply token is
    the teacher's, so the loss is 0 over a nonzero weight: the two sides' reply steps, streams
    and columns line up."""
    trainer = PostTrainer(_post_config(sft, "posttrain.prompts=3"), "kd", mesh=single_mesh,
                          progress=False)
    kd, params = trainer.method, trainer.setup.reference
    prompts = kd.prompts.batch(1)
    rolled = kd.rollout(params, [p.grid for p in prompts], jax.random.key(5), logprobs=False)
    tokens, segments = kd.teacher_inputs(prompts, rolled.tokens[:, :, -kd.steps:])
    batch = {"tokens": tokens, "segments": segments, "mask": rolled.mask}
    batch |= {f"teacher/{name}": logp for name, logp in
              kd._teacher_logp(kd.teacher, tokens, segments).items()}
    total, (weight, _) = kd.objective(trainer.plan.model(params), batch)
    assert float(weight) > 0
    assert abs(float(total)) < 1e-4 * float(weight)
    spoken, _ = kd.batch(params, 1, jax.random.key(5))  # the student hearing the question instead
    total, (weight, _) = kd.objective(trainer.plan.model(params), spoken)
    assert float(total) > 0.01 * float(weight)


def test_methods_resolve_through_the_registry(sft, single_mesh):
    """A new method is a module plus `register_method`: `slm posttrain` runs it by name, and
    an unknown name lists the registered ones."""
    from slm.posttrain import METHODS, register_method
    from slm.posttrain.grpo import GroupRelative

    assert list(METHODS)[:3] == ["kd", "dpo", "grpo"]
    register_method("grpo_twice", GroupRelative, "GRPO, two updates a step",
                    updates=lambda config: 2)
    try:
        result = posttrain(_post_config(sft, "train.steps=1"), "grpo_twice", mesh=single_mesh,
                           progress=False)
        assert int(result.state.step) == 2
    finally:
        METHODS.unregister("grpo_twice")
    with pytest.raises(ConfigError, match="choose one of dpo, grpo, kd"):
        PostTrainer(_post_config(sft), "ppo", mesh=single_mesh, progress=False)
    with pytest.raises(ConfigError, match="taken by `slm posttrain compare`"):
        register_method("compare", GroupRelative, "")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slm.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(1), cwd=REPO, timeout=HANG_GUARD_S)


@pytest.mark.parametrize("method", ["kd", "dpo", "grpo"])
def test_each_method_runs_through_the_cli_with_checkpoints_and_scalars(method, sft, tmp_path):
    out = tmp_path / method
    done = run_cli("posttrain", method, "--config", "configs/tiny/spoken.yaml",
                   *_cli_args(sft, f"checkpoint.dir={out}", "checkpoint.every_steps=1"))
    assert done.returncode == 0, done.stderr[-4000:]
    found = re.search(r"^step 2: loss (\S+) reward (\S+) accuracy (\S+)", done.stdout, re.M)
    assert found, done.stdout
    assert all(math.isfinite(float(v)) for v in found.groups())
    assert finalized_steps(out)[-1] == 2
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_cli_refuses_a_run_without_a_starting_checkpoint(sft):
    done = run_cli("posttrain", "grpo", "--config", "configs/tiny/spoken.yaml",
                   *_cli_args(sft, "checkpoint.init_from="))
    assert done.returncode == 2 and "checkpoint.init_from" in done.stderr, done.stderr[-2000:]


def test_kd_without_a_teacher_names_the_field(sft, single_mesh):
    with pytest.raises(ConfigError, match="posttrain.kd.teacher"):
        PostTrainer(_post_config(sft, "posttrain.kd.teacher="), "kd", mesh=single_mesh,
                    progress=False)


def test_offline_dpo_pairs_start_at_log_two(sft, single_mesh, tmp_path):
    """At step 1 the policy is the reference, so every pair's loss is exactly log 2."""
    vocab = vocab_from_config(_post_config(sft))
    text, units = vocab.ids("text").tolist(), vocab.ids("units").tolist()
    epad, eosp = vocab.special("<text_epad>"), vocab.special("<eosp>")
    pad, text_pad = vocab.pad_id, vocab.special("<text_pad>")
    lines = []
    for i in range(3):
        prompt = [[vocab.bos_id, *text[i:i + 3]], [pad, *units[i:i + 3]]]
        chosen = [[*text[:2], epad, text_pad], [pad, *units[:2], eosp]]
        rejected = [[text[5 + i], epad, text_pad, text_pad], [pad, units[3], eosp, pad]]
        lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    result = posttrain(_post_config(sft, "train.steps=1", f"posttrain.dpo.pairs={pairs}"), "dpo",
                       mesh=single_mesh, progress=False)
    (first,) = result.history
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert first["margin"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss_tokens"] == 2.0  # two pairs a step (posttrain.prompts), none tied


def test_resume_after_a_stop_is_bitwise(sft, single_mesh, tmp_path, toy_reward):
    """A run resumed from its step-2 checkpoint ends where the uninterrupted run ended: the
    same questions, rollout keys and updates (GRPO with two updates per rollout batch)."""
    common = ("train.steps=4", "checkpoint.every_steps=4", "checkpoint.keep=5",
              "posttrain.grpo.iterations=2", toy_reward)  # every 4 updates: every 2 steps
    whole_dir, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    whole = posttrain(_post_config(sft, *common, f"checkpoint.dir={whole_dir}"), "grpo",
                      mesh=single_mesh, progress=False)
    assert finalized_steps(whole_dir) == [4, 8]  # optimizer updates: two per step
    shutil.copytree(whole_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "8")
    shutil.rmtree(resumed_dir / "tb")
    resumed = posttrain(_post_config(sft, *common, f"checkpoint.dir={resumed_dir}"), "grpo",
                        mesh=single_mesh, progress=False)
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert any(h["reward"] not in (0.0, 1.0) for h in whole.history), "the rewards varied, so the rollouts steer the updates"
    assert_trees_equal(resumed.state.params, whole.state.params, "params")
    assert_trees_equal(resumed.state.opt_state, whole.state.opt_state, "optimizer state")
    for key in ("loss", "reward", "kl", "clipped"):
        assert [h[key] for h in resumed.history] == [h[key] for h in whole.history[2:]], key


def test_grpo_raises_a_toy_rule_reward(sft, single_mesh, toy_reward):
    """Over the first 3 steps 0.19 of the barely trained model's replies earn the toy reward,
    over the last 3 0.875 (measured); a GRPO that does nothing or climbs the wrong way fails
    the floor."""
    config = _post_config(sft, "train.steps=16", "posttrain.prompts=4", "posttrain.grpo.group=4",
                          "posttrain.rollout.max_steps=4", "optim.learning_rate=0.01",
                          "posttrain.grpo.kl_beta=0.0", toy_reward)
    history = posttrain(config, "grpo", mesh=single_mesh, progress=False).history
    before = np.mean([h["reward"] for h in history[:3]])
    after = np.mean([h["reward"] for h in history[-3:]])
    print(f"toy reward: first 3 steps {before:.3f}, last 3 steps {after:.3f}")
    assert after >= before + 0.4 and after >= 0.6, (before, after)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_distillation_brings_the_student_to_the_teacher(divergence, sft, single_mesh):
    """The teacher (the same checkpoint, reading the transcript) scores the student's own
    replies; a few steps close most of the gap (measured over 12 steps: 0.225 -> 0.032 forward,
    0.220 -> 0.032 reverse)."""
    config = _post_config(sft, "train.steps=5", "posttrain.prompts=4",
                          "optim.learning_rate=0.01", f"posttrain.kd.divergence={divergence}")
    kl = [h["kl"] for h in posttrain(config, "kd", mesh=single_mesh, progress=False).history]
    print(f"kd {divergence}: KL per step {np.round(kl, 3).tolist()}")
    assert kl[0] > 0.05, "the spoken and the written question must differ to begin with"
    assert max(kl[-2:]) < 0.5 * kl[0], kl
