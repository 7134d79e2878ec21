"""Parallel (PSLM / Mini-Omni) layout: exact round trips, the delayed grid, weights, and the
decode policy simulated in numpy over laid-out replies."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from slm.errors import ConfigError, DataError
from slm.strategies.base import stream_specs
from slm.strategies.parallel import Parallel
from slm.types import Segment
from slm.vocab import Vocab

VOCAB = Vocab.build(text_size=30, num_units=20, num_codebooks=3, codebook_size=8)
TEXT, UNITS = VOCAB.range("text"), VOCAB.range("units")
T, U = TEXT.start, UNITS.start


def ids_in(token_range, max_size):
    return st.lists(st.integers(token_range.start, token_range.stop - 1),
                    min_size=0, max_size=max_size).map(lambda x: np.array(x, np.int32))


@st.composite
def speech_of(draw, speech, codebooks):
    if speech == "units":
        return {"units": draw(ids_in(UNITS, 12))}
    frames = draw(st.integers(0, 10))
    rows = [draw(st.lists(st.integers(VOCAB.range(f"ac{q}").start, VOCAB.range(f"ac{q}").stop - 1),
                          min_size=frames, max_size=frames)) for q in range(codebooks)]
    return {"codes": np.array(rows, np.int32).reshape(codebooks, frames)}


@st.composite
def setups(draw):
    """A strategy over units or 2-3 codebooks, with default or random delays."""
    speech = draw(st.sampled_from(["units", "codes"]))
    codebooks = 1 if speech == "units" else draw(st.integers(2, 3))
    delays = draw(st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1 + codebooks,
                                                 max_size=1 + codebooks)))
    return Parallel(speech, None if speech == "units" else codebooks, delays, user_transcript=True), speech, codebooks


@st.composite
def turn(draw, role, speech, codebooks, spoken=False):
    """One turn, mostly spoken; its text may be longer or shorter than its speech."""
    if not spoken and draw(st.integers(0, 4)) == 0:
        return Segment(role, "text", text=draw(ids_in(TEXT, 8)))
    return Segment(role, "speech", text=draw(ids_in(TEXT, 8)), **draw(speech_of(speech, codebooks)))


@st.composite
def dialogues(draw):
    """1-4 turns of random roles."""
    strategy, speech, codebooks = draw(setups())
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=4))
    return strategy, [draw(turn(role, speech, codebooks)) for role in roles]


@st.composite
def exchanges(draw):
    """A user turn (spoken or text) and a spoken answer."""
    strategy, speech, codebooks = draw(setups())
    return (strategy, draw(turn("user", speech, codebooks)),
            draw(turn("assistant", speech, codebooks, spoken=True)))


def simulate(strategy, reply):
    """Run each stream's phase machine over the reply columns as the sampler would: wait
    `delay` steps emitting `fill`, then each token must be allowed in the current phase and
    moves the phase; once final, the stream emits `fill`. Returns, per stream, the column at
    which it became final (None if never), or None if any token is rejected."""
    policy, specs = strategy.policy(VOCAB), stream_specs(strategy, VOCAB)
    final_at = []
    for rule, spec, row in zip(policy.rules, specs, reply):
        local = {f: i for i, f in enumerate(np.concatenate([np.arange(a, b) for a, b in spec.spans]))}
        phase, done = rule.start, None
        for t, token in enumerate(row.tolist()):
            if t < rule.delay or rule.final[phase]:
                if token != rule.fill:
                    return None
                continue
            i = local.get(token)
            if i is None or not rule.allowed[phase, i]:
                return None
            phase = int(rule.next_phase[phase, i])
            done = t if rule.final[phase] else done
        final_at.append(done)
    return final_at


@settings(max_examples=100, deadline=None)
@given(dialogues())
def test_round_trip(case):
    strategy, segments = case
    back = strategy.unlayout(strategy.layout(segments, VOCAB), VOCAB)
    assert len(back) == len(segments) and all(a.same(b) for a, b in zip(back, segments))


@settings(max_examples=100, deadline=None)
@given(exchanges())
def test_exchange_prompt_prefix_and_policy(case):
    strategy, user, answer = case
    grid = strategy.layout([user, answer], VOCAB)
    prompt = strategy.prompt([user], VOCAB)
    p = prompt.tokens.shape[1]
    np.testing.assert_array_equal(grid.tokens[:, :p], prompt.tokens)
    np.testing.assert_array_equal(grid.weights[:, :p], prompt.weights)
    assert not prompt.weights.any() and grid.weights[:, p:].any()
    (back,) = strategy.unlayout(prompt, VOCAB)
    assert back.same(user)
    final_at = simulate(strategy, grid.tokens[:, p:])  # the sampler accepts the reply ...
    assert final_at is not None and None not in final_at
    assert max(final_at) == grid.tokens.shape[1] - p - 1  # ... and stops at its last column
    speech_rows = grid.tokens[1:, p:]
    complete = [t for t in range(speech_rows.shape[1])
                if all(VOCAB.range_of(c).kind in ("units", "acoustic") for c in speech_rows[:, t])]
    if complete:  # the first step by which every speech stream has spoken
        assert complete[0] == strategy.steps_to_first_audio()


def rows(grid):
    return [VOCAB.render(row).split() for row in grid.tokens]


def test_units_grid_delays_pads_and_weights():
    user = Segment("user", "speech", text=np.array([T, T + 1], np.int32),
                   units=np.array([U + 3, U + 4, U + 5], np.int32))
    answer = Segment("assistant", "speech", text=np.array([T + 2], np.int32),
                     units=np.array([U + 6, U + 7, U + 8, U + 9], np.int32))
    strategy = Parallel("units", user_transcript=True)
    grid = strategy.layout([user, answer], VOCAB)
    assert rows(grid) == [
        ["<bos>", "[Human]", "<t0>", "<t1>", "<text_epad>", "<text_pad>", "<text_pad>",
         "[Assistant]", "<t2>", "<text_epad>", "<text_pad>", "<text_pad>", "<text_pad>", "<text_pad>"],
        ["<pad>", "<pad>", "<pad>", "[Hu3]", "[Hu4]", "[Hu5]", "<eosp>",
         "<pad>", "<pad>", "[Hu6]", "[Hu7]", "[Hu8]", "[Hu9]", "<eosp>"],
    ]
    prompt = strategy.prompt([user], VOCAB)
    p = prompt.tokens.shape[1]
    assert p == 8 and np.array_equal(grid.tokens[:, :p], prompt.tokens)
    expected = np.zeros(grid.tokens.shape, np.float32)
    expected[0, p:] = 1.0  # text: weighted from the first reply step, its pads included
    expected[1, p + 1:] = 1.0  # units: the delay-fill step is not
    np.testing.assert_array_equal(grid.weights, expected)
    assert strategy.steps_to_first_audio() == 1
    back = strategy.unlayout(grid, VOCAB)
    assert back[0].same(user) and back[1].same(answer)


def test_codes_grid_ends_with_the_longer_text_and_stream_weights():
    codes = np.array([[VOCAB.codebook_id(q, c) for c in (1, 2)] for q in range(2)], np.int32)
    answer = Segment("assistant", "speech", text=np.arange(T, T + 5, dtype=np.int32), codes=codes)
    user = Segment("user", "text", text=np.array([T + 9], np.int32))
    strategy = Parallel("codes", num_codebooks=2, stream_weights=[0.5, 1.0, 2.0])
    grid = strategy.layout([user, answer], VOCAB)
    assert rows(grid) == [
        ["<bos>", "[Human]", "<t9>", "<text_epad>", "[Assistant]",
         "<t0>", "<t1>", "<t2>", "<t3>", "<t4>", "<text_epad>"],
        ["<pad>", "<pad>", "<pad>", "<pad>", "<pad>",
         "<pad>", "[Ac0_1]", "[Ac0_2]", "<eosp>", "<pad>", "<pad>"],
        ["<pad>", "<pad>", "<pad>", "<pad>", "<pad>",
         "<pad>", "<pad>", "[Ac1_1]", "[Ac1_2]", "<eosp>", "<pad>"],
    ]
    p = strategy.prompt([user], VOCAB).tokens.shape[1]
    assert p == 5 and not grid.weights[:, :p].any()
    np.testing.assert_array_equal(grid.weights[:, p:], [[0.5] * 6, [0] + [1.0] * 5, [0, 0] + [2.0] * 4])
    final_at = simulate(strategy, grid.tokens[:, p:])
    assert final_at == [5, 3, 4]  # the text ends last, at the last column
    assert strategy.steps_to_first_audio() == 2  # frame 0 is complete at reply step 2
    back = strategy.unlayout(grid, VOCAB)
    assert back[0].same(user) and back[1].same(answer)


def test_pretraining_weights_every_block_but_not_markers_or_delay_fill():
    user = Segment("user", "speech", text=np.array([T], np.int32), units=np.array([U, U], np.int32))
    grid = Parallel("units", delays=[0, 2]).layout([user], VOCAB)
    assert rows(grid)[1] == ["<pad>", "<pad>", "<pad>", "<pad>", "[Hu0]", "[Hu0]", "<eosp>"]
    np.testing.assert_array_equal(grid.weights, [[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    assert Parallel("units", delays=[0, 2]).steps_to_first_audio() == 2


def test_policy_rejects_wrong_tokens_and_early_stops():
    answer = Segment("assistant", "speech", text=np.array([T, T + 1], np.int32),
                     units=np.array([U + 1, U + 2, U + 3], np.int32))
    strategy = Parallel("units")
    grid = strategy.layout([answer], VOCAB)
    reply = grid.tokens[:, 2:]  # after <bos> [Assistant]
    assert simulate(strategy, reply) == [2, 4]
    bad = reply.copy()
    bad[1, 2] = T + 3  # a text token on the speech stream
    assert simulate(strategy, bad) is None
    bad = reply.copy()
    bad[0, 1] = VOCAB.special("<text_pad>")  # padding before the text has ended
    assert simulate(strategy, bad) is None
    bad = reply.copy()
    bad[1, 0] = U  # speaking during the delay
    assert simulate(strategy, bad) is None
    bad = reply.copy()
    bad[1, 4] = U  # no <eosp>: the stream never ends
    assert simulate(strategy, bad)[1] is None


def test_cut_reply_reads_back_and_bad_configs_fail():
    strategy = Parallel("codes")  # all 3 codebooks of the vocabulary, delays 0..3
    assert strategy.steps_to_first_audio(VOCAB) == 3
    with pytest.raises(ConfigError, match="vocabulary"):
        strategy.steps_to_first_audio()
    assert [s.name for s in strategy.streams(VOCAB)] == ["text", "ac0", "ac1", "ac2"]
    codes = np.array([[VOCAB.codebook_id(q, c) for c in range(4)] for q in range(3)], np.int32)
    answer = Segment("assistant", "speech", text=np.array([T], np.int32), codes=codes)
    grid = strategy.layout([answer], VOCAB)
    grid.tokens, grid.weights = grid.tokens[:, :7], grid.weights[:, :7]  # sampling stopped early
    (back,) = strategy.unlayout(grid, VOCAB)
    np.testing.assert_array_equal(back.codes, codes[:, :2])
    with pytest.raises(ConfigError, match="2 delays"):
        Parallel("codes", num_codebooks=2, delays=[0, 1])
    with pytest.raises(ConfigError, match="applies to speech"):
        Parallel("units", num_codebooks=2)
    with pytest.raises(DataError, match="units"):
        Parallel("units").layout([Segment("user", "speech", text=np.array([T]))], VOCAB)
    with pytest.raises(Exception, match="ac0"):  # codebook ids on the wrong stream
        Parallel("codes", num_codebooks=2).layout([Segment("user", "speech", codes=codes[::-1])], VOCAB)


def test_spoken_user_turns_are_heard_not_read_by_default():
    """At inference a spoken question comes without its transcript, so training must not rely
    on it: by default the user's text stream holds only the end-of-text marker."""
    user = Segment("user", "speech", text=np.array([T, T + 1], np.int32),
                   units=np.array([U + 3, U + 4], np.int32))
    grid = Parallel("units").prompt([user], VOCAB)
    assert rows(grid)[0] == ["<bos>", "[Human]", "<text_epad>", "<text_pad>", "<text_pad>",
                             "<text_pad>", "[Assistant]"]  # the unit row: 1 delay + 2 units + <eosp>
    heard = Segment("user", "speech", units=user.units)
    np.testing.assert_array_equal(grid.tokens, Parallel("units").prompt([heard], VOCAB).tokens)
