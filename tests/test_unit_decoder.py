"""The CTC unit decoder (head kind `ctc_units`): its loss per reply, also in packed rows, and
its decoding on device, state by state, against the whole reply's greedy CTC."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slm.config import ModelConfig
from slm.model import SpeechLM
from slm.model.unit_decoder import CTCUnits
from slm.sample import GREEDY, Sampler, StreamSampling
from slm.strategies.base import stream_specs
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.strategies.text_driven import TextDriven
from slm.types import Grid, Segment
from slm.vocab import Vocab

nnx.use_eager_sharding(False)

VOCAB = Vocab.build(text_size=30, num_units=12)
LAMBDA = 3


def model(max_states: int = 64, seed: int = 0) -> SpeechLM:
    strategy = TextDriven(upsample=LAMBDA)
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      streams=strategy.streams(VOCAB),
                      head_options={"ctc_units": {"d_model": 16, "num_heads": 2, "mlp_dim": 32,
                                                  "max_states": max_states}})
    return SpeechLM(cfg, VOCAB, nnx.Rngs(seed))


def exchange(rng: np.random.Generator, words: int, units: int) -> list[Segment]:
    """A spoken question and a spoken answer of `words` text tokens and `units` unit frames."""
    return [Segment("user", "speech", units=VOCAB.unit_id(rng.integers(0, 12, 5))),
            Segment("assistant", "speech", text=VOCAB.text_id(rng.integers(0, 30, words)),
                    units=VOCAB.unit_id(rng.integers(0, 12, units)))]


def dialogues() -> list[Grid]:
    """Three examples: one answer, a longer one, and a two-turn dialogue (two replies)."""
    rng = np.random.default_rng(0)
    strategy = TextDriven(upsample=LAMBDA)
    return [strategy.layout(exchange(rng, 2, 5), VOCAB),
            strategy.layout(exchange(rng, 4, 9), VOCAB),
            strategy.layout(exchange(rng, 3, 6) + exchange(rng, 2, 4), VOCAB)]


def losses(lm: SpeechLM, grids: list[Grid], segments: np.ndarray | None = None) -> dict:
    tokens = np.stack([g.tokens for g in grids])
    weights = np.stack([g.weights for g in grids])
    _, _, metrics = lm.loss(jnp.asarray(tokens), jnp.asarray(weights),
                            None if segments is None else jnp.asarray(segments))
    return jax.device_get(metrics)


def test_a_packed_row_scores_each_reply_as_it_would_alone():
    lm, grids = model(), dialogues()
    alone = [losses(lm, [g]) for g in grids]
    packed = losses(lm, [Grid.concat(grids)],
                    np.concatenate([np.full(g.steps, i + 1) for i, g in enumerate(grids)])[None])
    for key in ("loss_sum/units", "weight_sum/units", "loss_sum/text"):
        np.testing.assert_allclose(packed[key], sum(a[key] for a in alone), rtol=2e-5)
    laid_out = sum(np.isin(g.tokens[1:], VOCAB.ids("units")).sum() for g in grids)
    assert packed["weight_sum/units"] == laid_out and packed["invalid_targets"] == 0


def test_one_reply_costs_the_ctc_of_its_frames_against_its_units():
    lm, grid = model(), dialogues()[1]
    head: CTCUnits = lm.head_kinds["ctc_units"]
    hidden = lm(jnp.asarray(grid.tokens[None])).hidden
    spoken = np.flatnonzero(grid.weights[1, 1:] > 0)  # state t speaks the block at t + 1
    logits = head.frame_logits(hidden[:, spoken], jnp.ones((1, len(spoken)), jnp.int32))
    slots = grid.tokens[1:].T.ravel()  # the blocks in reading order
    units = VOCAB.local("units", slots[np.isin(slots, VOCAB.ids("units"))])
    want = optax.ctc_loss(logits, jnp.zeros(logits.shape[:2]), jnp.asarray(units[None]),
                          jnp.zeros((1, len(units))), blank_id=12)
    got = losses(lm, [grid])
    np.testing.assert_allclose(got["loss_sum/units"], want[0], rtol=1e-5)
    assert len(spoken) == 4 and got["weight_sum/units"] == len(units)


def test_replies_past_max_states_are_left_out_and_counted():
    grids = dialogues()[:2]  # 2 and 4 speaking states
    row = [Grid.concat(grids)]
    segments = np.concatenate([np.full(g.steps, i + 1) for i, g in enumerate(grids)])[None]
    capped, first = losses(model(max_states=5), row, segments), losses(model(max_states=5), grids[:1])
    np.testing.assert_allclose(capped["loss_sum/units"], first["loss_sum/units"], rtol=2e-5)
    assert capped["weight_sum/units"] == first["weight_sum/units"]
    assert capped["invalid_targets"] == losses(model(), [grids[1]])["weight_sum/units"] > 0


def test_the_model_never_reads_the_unit_streams():
    lm, grid = model(), dialogues()[0]
    tokens = grid.tokens.copy()
    tokens[1:] = VOCAB.unit_id(3)
    same = [lm(jnp.asarray(t[None])).hidden for t in (grid.tokens, tokens)]
    np.testing.assert_array_equal(same[0], same[1])


def writing_policy() -> DecodePolicy:
    """Text ids only, never final: every step writes text, so every state speaks."""
    text, *units = stream_specs(TextDriven(upsample=LAMBDA), VOCAB)
    rules = [RuleBuilder(text).phase("text", VOCAB.ids("text")).build(start="text", fill=VOCAB.pad_id)]
    rules += [RuleBuilder(s).phase("spoken", [], final=True).build(start="spoken", fill=VOCAB.pad_id)
              for s in units]
    return DecodePolicy(tuple(rules))


def greedy_units(logits_fv: np.ndarray, blank: int) -> list[int]:
    """CTC greedy: argmax per frame, collapse repeats, drop blanks."""
    best = np.argmax(logits_fv, axis=-1)
    return [int(u) for i, u in enumerate(best) if u != blank and (i == 0 or u != best[i - 1])]


@pytest.mark.parametrize("seed", [0, 1])
def test_decoding_state_by_state_gives_the_whole_replys_greedy_units_in_any_chunks(seed):
    lm, steps = model(seed=seed), 9
    rng = np.random.default_rng(seed)
    strategy = TextDriven(upsample=LAMBDA)
    prompts = np.stack([strategy.prompt(exchange(rng, 2, 5)[:1], VOCAB).tokens for _ in range(2)])
    # sampled text, so the states differ from step to step (greedy text from random weights
    # repeats a token, and its units collapse into a few)
    sampling = (StreamSampling(temperature=1.0),) + (GREEDY,) * LAMBDA
    sampler = Sampler(lm, writing_policy(), VOCAB, sampling, max_steps=steps)
    whole = jax.device_get(sampler(prompts, jax.random.key(0)).tokens)
    loop = sampler.start(prompts, jax.random.key(0))
    for until in (2, 3, 7, steps):  # streaming: units as they are decoded, Ω = 2, 1, 4, 2
        loop = sampler.advance(loop, until)
    np.testing.assert_array_equal(jax.device_get(loop.tokens), whole)

    head: CTCUnits = lm.head_kinds["ctc_units"]
    for b in range(2):
        full = np.concatenate([prompts[b], whole[b]], axis=1)
        hidden = lm(jnp.asarray(full[None])).hidden
        # reply step j speaks the state made by step j - 1: steps 0 .. steps - 2 are spoken
        states = hidden[:, prompts.shape[2]:prompts.shape[2] + steps - 1]
        logits = head.frame_logits(states, jnp.ones(states.shape[:2], jnp.int32))[0]
        want = greedy_units(np.asarray(logits), head.blank)
        slots = whole[b, 1:].T.ravel()  # blocks in reading order
        got = VOCAB.local("units", slots[np.isin(slots, VOCAB.ids("units"))]).tolist()
        assert got == want, (b, got, want)
        assert len(want) >= 5, "a near-silent reply is a weak comparison; change seed"
        assert np.all(whole[b, 1:, 0] == VOCAB.pad_id)  # nothing is spoken before a state exists


def test_slm_train_runs_text_driven_from_the_tiny_config(prepared):
    import re
    import subprocess
    import sys

    from tests.conftest import REPO, SUBPROCESS_ENV

    root, _ = prepared
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "train", "--config", "configs/tiny/spoken.yaml",
         "strategy.name=text_driven", f"tokenizers.dir={root / 'tok'}",
         f"data.dir={root / 'shards'}", "train.steps=2", "model.num_layers=1", "model.d_model=32",
         "model.mlp_dim=64", "data.seq_len=128", "data.batch_size=4",
         "model.head_options={ctc_units: {d_model: 32, num_heads: 2, mlp_dim: 64}}"],
        capture_output=True, text=True, cwd=REPO, env=SUBPROCESS_ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"^step 2: loss \S+$", done.stdout, re.M), done.stdout
