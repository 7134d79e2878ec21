"""Coarse-to-fine layout: exact round trips, the rendered grid, and the decode phase machines."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from slm.errors import DataError
from slm.strategies.base import stream_specs
from slm.strategies.coarse_to_fine import CoarseToFine
from slm.types import Segment
from slm.vocab import Vocab

VOCAB = Vocab.build(text_size=30, num_units=20, num_codebooks=3, codebook_size=8)
TEXT, UNITS = VOCAB.range("text"), VOCAB.range("units")
RATE = 50.0


def names(prefix, ids) -> list[str]:
    return [f"[{prefix}{i}]" for i in ids]


def times(frames) -> np.ndarray:
    return (np.asarray(frames, np.float64) / RATE).astype(np.float32)


@st.composite
def utterance(draw, q: int, role: str, shifted: bool = False):
    """Random aligned speech. Unshifted: each word spans at least its pieces + 1 frames and the
    first starts at frame >= 1, so every word's pieces start exactly at its start frame."""
    words = draw(st.integers(0, 4))
    pieces = [draw(st.integers(1, 3)) for _ in range(words)]
    starts, frame = [], draw(st.integers(0 if shifted else 1, 3))
    for p in pieces:
        starts.append(frame)
        frame += draw(st.integers(0 if shifted else p + 1, p + 4))
    n = max(frame, (starts[-1] + 1) if starts else 0) + draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    text = rng.integers(TEXT.start, TEXT.stop, sum(pieces)).astype(np.int32)
    units = rng.integers(UNITS.start, UNITS.stop, n).astype(np.int32)
    codes = np.stack([VOCAB.codebook_id(k, rng.integers(0, 8, n)) for k in range(q)]).reshape(q, n)
    word_times = np.stack([times(starts), times(np.array(starts) + 1)], 1).reshape(-1, 2)
    segment = Segment(role, "speech", text=text if words else None,
                      word_ends=np.cumsum(pieces).astype(np.int32) if words else None,
                      units=units, codes=codes.astype(np.int32), word_times=word_times if words else None)
    ends = np.append(starts[1:], n).astype(np.int64)
    expected = Segment(role, "speech", units=units, codes=segment.codes)
    if role == "assistant" and words:  # the documented frame-quantized view
        expected = Segment(role, "speech", text=text, word_ends=segment.word_ends, units=units,
                           codes=segment.codes, word_times=np.stack([times(starts), times(ends)], 1))
    return segment, expected


@st.composite
def dialogue(draw):
    q, d = draw(st.sampled_from([1, 3])), draw(st.integers(0, 2))
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=4))
    pairs = [draw(utterance(q, role)) for role in roles]
    return CoarseToFine(q, acoustic_delay=d), [s for s, _ in pairs], [e for _, e in pairs]


@settings(max_examples=60, deadline=None)
@given(dialogue())
def test_round_trip(case):
    strategy, segments, expected = case
    grid = strategy.layout(segments, VOCAB)
    back = strategy.unlayout(grid, VOCAB)
    assert len(back) == len(expected) and all(a.same(b) for a, b in zip(back, expected))
    for k, segment in enumerate(segments):  # every reply continues the prompt of what precedes it
        if segment.role == "assistant":
            prompt = strategy.prompt(segments[:k], VOCAB).tokens
            np.testing.assert_array_equal(grid.tokens[:, :prompt.shape[1]], prompt)
    assert set(np.unique(grid.weights)) <= {0.0, 1.0}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 3]), st.integers(0, 2), st.data())
def test_overlapping_words_shift_right_and_keep_text(q, d, data):
    segment, _ = data.draw(utterance(q, "assistant", shifted=True))
    strategy = CoarseToFine(q, acoustic_delay=d)
    (back,) = strategy.unlayout(strategy.layout([segment], VOCAB), VOCAB)
    for field in ("text", "word_ends", "units", "codes"):
        a, b = getattr(back, field), getattr(segment, field)
        assert (a is None and b is None) or np.array_equal(a, b)
    if segment.word_times is not None:  # recovered starts: the placed frame, never earlier
        assert np.all(back.word_times[:, 0] >= segment.word_times[:, 0])
        assert np.all(np.diff(back.word_times[:, 0]) > 0)


def small_example(q=2):
    """A 2-frame user turn (its transcript is ignored) and a 5-frame reply of words at frames 1, 4."""
    user = Segment("user", "speech", units=VOCAB.unit_id(np.array([1, 2])),
                   codes=np.stack([VOCAB.codebook_id(k, np.array([2 * k, 2 * k + 1])) for k in range(q)]),
                   text=VOCAB.text_id(np.array([9])), word_ends=np.array([1]), word_times=times([[0, 1]]))
    reply = Segment("assistant", "speech", units=VOCAB.unit_id(np.arange(3, 8)),
                    codes=np.stack([VOCAB.codebook_id(k, (np.arange(5) + 3 * k) % 8) for k in range(q)]),
                    text=VOCAB.text_id(np.array([0, 1, 2])), word_ends=np.array([2, 3]),
                    word_times=times([[1, 3], [4, 5]]))
    return user, reply


def test_rendered_grid_weights_and_prompt():
    user, reply = small_example()
    strategy = CoarseToFine(2, acoustic_delay=1)
    grid = strategy.layout([user, reply], VOCAB)
    rows = [VOCAB.render(row).split() for row in grid.tokens]
    tp, ep = "<text_pad>", "<text_epad>"
    assert rows == [
        [tp, tp, "<eosp>", tp] + [tp] + [ep, "<t0>", "<t1>", ep, "<t2>", "<eosp>", tp],
        ["[Hu1]", "[Hu2]", "<eosp>", "<pad>"] + ["<sosp>"] + names("Hu", range(3, 8)) + ["<eosp>", "<pad>"],
        ["<pad>", "[Ac0_0]", "[Ac0_1]", "<eosp>"] + ["<pad>"] + ["<pad>"] + names("Ac0_", range(5)) + ["<eosp>"],
        ["<pad>", "[Ac1_2]", "[Ac1_3]", "<eosp>"] + ["<pad>"] + ["<pad>"] + names("Ac1_", range(3, 8)) + ["<eosp>"],
    ]
    prompt = strategy.prompt([user], VOCAB)
    assert prompt.tokens.shape[1] == 5
    np.testing.assert_array_equal(grid.tokens[:, :5], prompt.tokens)
    weights = np.zeros((4, 12))
    weights[0:2, 5:11] = 1  # text and semantic: the 5 frames and the <eosp> column; tail fill 0
    weights[2:, 6:12] = 1  # acoustic: after the 1-step delay fill
    np.testing.assert_array_equal(grid.weights, weights)
    assert strategy.steps_to_first_audio() == 1
    # user-only (pretraining): every valid cell is weighted, delay fill is not
    alone = strategy.layout([user], VOCAB)
    np.testing.assert_array_equal(alone.tokens, prompt.tokens)
    np.testing.assert_array_equal(alone.weights, [[1, 1, 1, 0, 1]] * 2 + [[0, 1, 1, 1, 0]] * 2)


def test_word_at_frame_zero_and_overflow_shift_right():
    strategy = CoarseToFine(1, acoustic_delay=0)
    reply = Segment("assistant", "speech", units=VOCAB.unit_id(np.array([0, 1])),
                    codes=VOCAB.codebook_id(0, np.array([[0, 1]])), word_ends=np.array([1, 4]),
                    text=VOCAB.text_id(np.array([0, 1, 2, 3])), word_times=times([[0, 1], [1, 2]]))
    grid = strategy.layout([reply], VOCAB)
    # word 0 starts at frame 0: its <text_epad> takes frame 0; word 1 then starts late and
    # its pieces run past the speech, growing the block
    ep = "<text_epad>"
    assert VOCAB.render(grid.tokens[0, 1:]).split() == [ep, "<t0>", ep, "<t1>", "<t2>", "<t3>", "<eosp>"]
    assert VOCAB.render(grid.tokens[1, 1:]).split() == ["[Hu0]", "[Hu1]", "<eosp>"] + ["<pad>"] * 4
    np.testing.assert_array_equal(grid.weights[:, 1:], [[1] * 7] + [[1, 1, 1, 0, 0, 0, 0]] * 2)
    (back,) = strategy.unlayout(grid, VOCAB)
    np.testing.assert_array_equal(back.word_times, times([[1, 3], [3, 3]]))
    # the reply ends at the text's <eosp>, after the speech streams have finished
    rules, specs = strategy.policy(VOCAB).rules, stream_specs(strategy, VOCAB)
    finals = np.array([simulate(r, s, row) for r, s, row in zip(rules, specs, grid.tokens[:, 1:])])
    assert finals[:, -1].all() and not finals[:, :-1].all(axis=0).any() and finals[1:, 3].all()


def test_units_align_to_codes_within_skew():
    strategy = CoarseToFine(1, acoustic_delay=1)
    codes = VOCAB.codebook_id(0, np.zeros((1, 4), int))
    short = Segment("user", "speech", units=VOCAB.unit_id(np.array([1, 2, 3])), codes=codes)
    (back,) = strategy.unlayout(strategy.layout([short], VOCAB), VOCAB)
    np.testing.assert_array_equal(back.units, VOCAB.unit_id(np.array([1, 2, 3, 3])))
    with pytest.raises(DataError, match="unit frames"):
        strategy.layout([Segment("user", "speech", units=VOCAB.unit_id(np.array([1])), codes=codes)], VOCAB)
    with pytest.raises(DataError, match="speech segments"):
        strategy.layout([Segment("user", "text", text=VOCAB.text_id(np.array([1])))], VOCAB)


def simulate(rule, spec, tokens) -> list[bool] | None:
    """The sampler's contract (`slm.sample`) in numpy: fill while waiting and once final, else
    only allowed ids, moving phases as sampled. Whether final after each column (None: rejected)."""
    flat = np.concatenate([np.arange(a, b) for a, b in spec.spans])
    local = {int(f): i for i, f in enumerate(flat)}
    phase, finals = rule.start, []
    for t, token in enumerate(tokens.tolist()):
        if t < rule.delay or rule.final[phase]:
            if token != rule.fill:
                return None
        else:
            i = local.get(token)
            if i is None or not rule.allowed[phase, i]:
                return None
            phase = rule.next_phase[phase, i]
        finals.append(bool(rule.final[phase]))
    return finals


@pytest.mark.parametrize("q,d", [(1, 0), (2, 1), (3, 2)])
def test_policy_accepts_reply_and_finishes_at_last_column(q, d):
    user, reply = small_example(q)
    strategy = CoarseToFine(q, acoustic_delay=d)
    grid = strategy.layout([user, reply], VOCAB)
    columns = grid.tokens[:, strategy.prompt([user], VOCAB).tokens.shape[1]:]
    policy, specs = strategy.policy(VOCAB), stream_specs(strategy, VOCAB)
    assert len(policy.rules) == len(specs) == 2 + q
    finals = np.array([simulate(r, s, row) for r, s, row in zip(policy.rules, specs, columns)])
    assert finals.dtype == bool and finals[:, -1].all()
    assert not finals[:, :-1].all(axis=0).any()  # the reply is not over before its last column
    complete = [t for t in range(columns.shape[1])
                if all(c in VOCAB.range(f"ac{k}") for k, c in enumerate(columns[2:, t]))]
    assert complete[0] == strategy.steps_to_first_audio()
    bad = columns[0].copy()
    bad[2] = UNITS.start  # a unit on the text stream
    assert simulate(policy.rules[0], specs[0], bad) is None
    assert simulate(policy.rules[1], specs[1], columns[0]) is None  # text on the semantic stream


def test_without_user_codes_the_user_is_heard_through_units_alone():
    rng = np.random.default_rng(0)
    n = 6
    units = rng.integers(UNITS.start, UNITS.stop, n).astype(np.int32)
    codes = np.stack([VOCAB.codebook_id(k, rng.integers(0, 8, n)) for k in range(3)]).astype(np.int32)
    user = Segment("user", "speech", units=units, codes=codes)
    reply = Segment("assistant", "speech", units=units, codes=codes)
    hearing, deaf = CoarseToFine(3), CoarseToFine(3, user_codes=False)
    assert hearing.frame_aligned and not deaf.frame_aligned  # so the user's units are deduplicated
    full, units_only = hearing.layout([user, reply], VOCAB), deaf.layout([user, reply], VOCAB)
    user_cols = slice(0, n + 2)  # the user's frames, <eosp> and the acoustic delay
    assert np.all(units_only.tokens[2:, user_cols] == VOCAB.pad_id)
    np.testing.assert_array_equal(units_only.tokens[:2], full.tokens[:2])
    np.testing.assert_array_equal(units_only.tokens[:, n + 2:], full.tokens[:, n + 2:])  # the reply
    np.testing.assert_array_equal(units_only.weights, full.weights)
