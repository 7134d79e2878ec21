"""Strategy layouts: exact round trips on random segments, markers and loss weights."""

import numpy as np
from hypothesis import given, settings, strategies as st

from slm.strategies.interleaved import Interleaved, interleave
from slm.types import Grid, Segment
from slm.vocab import Vocab

VOCAB = Vocab.build(text_size=30, num_units=20, num_codebooks=2, codebook_size=8)
TEXT, UNITS = VOCAB.range("text"), VOCAB.range("units")


def ids_in(token_range, min_size=1, max_size=8):
    return st.lists(st.integers(token_range.start, token_range.stop - 1),
                    min_size=min_size, max_size=max_size).map(lambda x: np.array(x, np.int32))


@st.composite
def alternating_segments(draw):
    count = draw(st.integers(1, 6))
    modality = draw(st.sampled_from(["text", "speech"]))
    segments = []
    for _ in range(count):
        if modality == "text":
            segments.append(Segment("user", "text", text=draw(ids_in(TEXT))))
        else:
            segments.append(Segment("user", "speech", units=draw(ids_in(UNITS))))
        modality = "speech" if modality == "text" else "text"
    return segments


@given(alternating_segments())
def test_interleaved_round_trip(segments):
    strategy = Interleaved()
    grid = strategy.layout(segments, VOCAB)
    back = strategy.unlayout(grid, VOCAB)
    assert len(back) == len(segments) and all(a.same(b) for a, b in zip(back, segments))


def test_interleaved_marks_only_modality_changes_and_weights_everything():
    text = Segment("user", "text", text=np.array([TEXT.start, TEXT.start + 1]))
    speech = Segment("user", "speech", units=np.array([UNITS.start + 3]))
    grid = Interleaved().layout([speech, text, text, speech], VOCAB)
    rendered = VOCAB.render(grid.tokens[0]).split()
    assert rendered == ["<bos>", "[Speech]", "[Hu3]", "[Text]", "<t0>", "<t1>", "<t0>", "<t1>",
                        "[Speech]", "[Hu3]", "<eos>"]
    assert grid.weights.shape == grid.tokens.shape and np.all(grid.weights == 1.0)
    assert [s.modality for s in Interleaved().unlayout(grid, VOCAB)] == ["speech", "text", "speech"]


@settings(max_examples=50)
@given(words=st.integers(1, 8), seed=st.integers(0, 10_000), switch=st.floats(0.0, 1.0))
def test_interleave_partitions_words_and_units(words, seed, switch):
    rng = np.random.default_rng(seed)
    per_word = rng.integers(1, 4, size=words)
    text = rng.integers(TEXT.start, TEXT.stop, size=per_word.sum()).astype(np.int32)
    frames = rng.integers(1, 6, size=words)
    units = rng.integers(UNITS.start, UNITS.stop, size=frames.sum()).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(frames)[:-1]]) / 50.0
    times = np.stack([starts, starts + frames / 50.0], axis=1).astype(np.float32)
    speech = Segment("user", "speech", text=text, word_ends=np.cumsum(per_word).astype(np.int32),
                     units=units, word_times=times)
    runs = interleave(speech, rng, unit_rate=50.0, switch_prob=switch)
    assert [r.modality for r in runs] == [["text", "speech"][(i + (runs[0].modality == "speech")) % 2]
                                          for i in range(len(runs))]
    # every word appears exactly once, in order, as text pieces or as its unit frames
    word_units = np.split(units, np.cumsum(frames)[:-1])
    word_text = np.split(text, np.cumsum(per_word)[:-1])
    w = 0
    for r in runs:
        chunk = r.text if r.modality == "text" else r.units
        pieces = word_text if r.modality == "text" else word_units
        taken = 0
        while taken < len(chunk):
            np.testing.assert_array_equal(chunk[taken:taken + len(pieces[w])], pieces[w])
            taken += len(pieces[w])
            w += 1
    assert w == words


def test_grid_rejects_mismatched_shapes():
    import pytest

    with pytest.raises(ValueError, match="K, T"):
        Grid(np.zeros((1, 3), np.int32), np.zeros((1, 4), np.float32))


def test_interleaved_weights_only_the_reply_when_there_is_one():
    question = Segment("user", "speech", units=np.array([UNITS.start, UNITS.start + 1]))
    answer = Segment("assistant", "text", text=np.array([TEXT.start + 2]))
    grid = Interleaved().layout([question, answer], VOCAB)
    assert VOCAB.render(grid.tokens[0]).split() == ["<bos>", "[Speech]", "[Hu0]", "[Hu1]", "[Text]",
                                                    "<t2>", "<eos>"]
    np.testing.assert_array_equal(grid.weights[0], [0, 0, 0, 0, 1, 1, 1])


def test_interleaved_reply_continues_in_the_prompt_modality():
    from slm.strategies.base import assistant_turn, run

    strategy = Interleaved()
    prompt = strategy.prompt([Segment("user", "text", text=np.array([TEXT.start]))], VOCAB)
    reply = run([TEXT.start + 1, VOCAB.special("[Speech]"), UNITS.start, VOCAB.eos_id], 0.0)
    turn = assistant_turn(strategy, prompt, reply, VOCAB)
    assert [(s.role, s.modality) for s in turn] == [("assistant", "text"), ("assistant", "speech")]
    np.testing.assert_array_equal(turn[0].text, [TEXT.start + 1])
    np.testing.assert_array_equal(turn[1].units, [UNITS.start])
