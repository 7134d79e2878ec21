"""Text-driven layout: round trips per task, where the units lie, weights, CTC's capacity."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from slm.errors import DataError
from slm.speech.runs import dedup_units
from slm.strategies import make_strategy
from slm.config import StrategyConfig
from slm.strategies.text_driven import TextDriven
from slm.types import Segment
from slm.vocab import Vocab

VOCAB = Vocab.build(text_size=30, num_units=20)
TEXT, UNITS = VOCAB.range("text"), VOCAB.range("units")
LAMBDA = 3


def ids_in(token_range, min_size=0, max_size=8):
    return st.lists(st.integers(token_range.start, token_range.stop - 1),
                    min_size=min_size, max_size=max_size).map(lambda x: np.array(x, np.int32))


@st.composite
def spoken_units(draw, most: int):
    """Frame-level unit ids whose de-duplicated run has at most `most` units."""
    runs = draw(st.lists(st.integers(UNITS.start, UNITS.stop - 1), max_size=most))
    runs = [u for i, u in enumerate(runs) if i == 0 or u != runs[i - 1]]
    frames = draw(st.lists(st.integers(1, 3), min_size=len(runs), max_size=len(runs)))
    return np.repeat(np.array(runs, np.int32), frames)


@st.composite
def dialogues(draw, task):
    """Alternating turns for `task`; a spoken reply has at most λ units per text token."""
    segments = []
    for _ in range(draw(st.integers(1, 3))):
        if task == "tts" or (task == "answer" and draw(st.booleans())):
            segments.append(Segment("user", "text", text=draw(ids_in(TEXT, min_size=1))))
        else:
            segments.append(Segment("user", "speech", units=draw(ids_in(UNITS))))
        text = draw(ids_in(TEXT, min_size=1))
        if task == "transcribe" or (task == "answer" and draw(st.booleans())):
            segments.append(Segment("assistant", "text", text=text))
            continue
        spoken = segments[-1].text if task == "tts" else text
        segments.append(Segment("assistant", "speech", text=None if task == "tts" else text,
                                units=draw(spoken_units(len(spoken) * LAMBDA))))
    return segments


def read_back(segments, task, unit_frames):
    """What unlayout must give: spoken replies with their text (tts: the user's) and their
    de-duplicated units, each `unit_frames` long."""
    out = []
    for user, reply in zip(segments[::2], segments[1::2]):
        out.append(user)
        if reply.modality == "text":
            out.append(reply)
        else:
            units = dedup_units(reply.units)[0]
            text = user.text if task == "tts" else reply.text
            out.append(Segment("assistant", "speech", text=text,
                               units=np.repeat(units, unit_frames)) if units.size
                       else Segment("assistant", "text", text=text))
    return out


@pytest.mark.parametrize("task", ["answer", "transcribe", "tts"])
def test_round_trip_and_prompt_prefix(task):
    strategy = TextDriven(task, upsample=LAMBDA, unit_frames=2)

    @settings(max_examples=40, deadline=None)
    @given(dialogues(task))
    def check(segments):
        grid = strategy.layout(segments, VOCAB)
        assert grid.tokens.shape[0] == 1 + LAMBDA
        back = strategy.unlayout(grid, VOCAB)
        want = read_back(segments, task, 2)
        assert len(back) == len(want)
        for got, expected in zip(back, want):
            assert got.same(expected), (got, expected)
        # reading back is exact on the grid: laying the read-back out again gives the grid
        again = strategy.layout(back, VOCAB) if task != "tts" else grid
        np.testing.assert_array_equal(again.tokens, grid.tokens)
        prompt = strategy.prompt(segments[:-1], VOCAB)
        np.testing.assert_array_equal(grid.tokens[:, :prompt.steps], prompt.tokens)

    check()


def test_units_fill_the_blocks_after_each_text_step_and_only_they_are_weighted():
    strategy = TextDriven(upsample=2)
    answer_text = VOCAB.text_id(np.array([5, 6, 7]))
    units = VOCAB.unit_id(np.array([1, 1, 2, 3, 3, 4, 5]))  # de-duplicated: 1 2 3 4 5
    question = Segment("user", "speech", units=VOCAB.unit_id(np.array([9, 9, 8])))
    grid = strategy.layout([question, Segment("assistant", "speech", text=answer_text, units=units)],
                           VOCAB)
    r, sp = VOCAB.render, VOCAB.special
    assert r(grid.tokens[0]).split() == (
        f"<bos> [Human] <sosp> {r(question.units)} <eosp> <eoh> [Assistant] {r(answer_text)} "
        "<eoa> <eos>").split()
    start = grid.steps - 5  # the answer's first text step
    pad = VOCAB.pad_id
    blocks = grid.tokens[1:, start:]  # [λ, a1 a2 a3 <eoa> <eos>]
    want = np.array([[pad, VOCAB.unit_id(1), VOCAB.unit_id(3), VOCAB.unit_id(5), pad],
                     [pad, VOCAB.unit_id(2), VOCAB.unit_id(4), pad, pad]])
    np.testing.assert_array_equal(blocks, want)
    assert np.all(grid.tokens[1:, :start] == pad)
    # the text row weights the reply and <eos>; unit rows weight the three speaking blocks
    np.testing.assert_array_equal(grid.weights[0], (np.arange(grid.steps) >= start).astype(float))
    spoken = np.zeros(grid.steps)
    spoken[start + 1:start + 4] = 1.0
    np.testing.assert_array_equal(grid.weights[1:], np.stack([spoken, spoken]))
    assert grid.tokens[0, start - 1] == sp("[Assistant]")


def test_more_units_than_ctc_frames_is_a_named_error():
    strategy = TextDriven(upsample=2)
    reply = Segment("assistant", "speech", text=VOCAB.text_id(np.array([1, 2])),
                    units=VOCAB.unit_id(np.array([1, 2, 3, 4, 5])))  # 5 > 2 tokens x 2 frames
    question = Segment("user", "text", text=VOCAB.text_id(np.array([3])))
    with pytest.raises(DataError, match=r"2 text tokens has 5 de-duplicated units.*"
                                        r"strategy\.options\.upsample to >= 3"):
        strategy.layout([question, reply], VOCAB)
    with pytest.raises(DataError, match="needs its text"):
        strategy.layout([question, dataclasses.replace(reply, text=np.zeros(0, np.int32))], VOCAB)


def test_policy_writes_text_until_eoa_and_the_unit_streams_sample_nothing():
    strategy = TextDriven(upsample=3)
    text_rule, *unit_rules = strategy.policy(VOCAB).rules
    assert len(unit_rules) == 3
    for rule in unit_rules:
        assert rule.final[rule.start] and not rule.allowed.any() and rule.fill == VOCAB.pad_id
    assert text_rule.allowed[text_rule.start].sum() == VOCAB.range("text").size + 1  # and <eoa>
    streams = strategy.streams(VOCAB)
    assert [s.head for s in streams] == ["temporal"] + ["ctc_units"] * 3
    assert [s.name for s in streams] == ["text", "units", "units_1", "units_2"]


def test_options_come_from_the_config():
    strategy = make_strategy(StrategyConfig("text_driven", {"upsample": 5, "unit_frames": 4}),
                             VOCAB, data_task="tts")
    assert (strategy.task, strategy.upsample, strategy.unit_frames) == ("tts", 5, 4)


def test_without_speech_targets_a_spoken_reply_trains_its_text_alone():
    """The first of two stages: the same text steps and weights, no unit slot weighted."""
    question = Segment("user", "speech", units=VOCAB.unit_id(np.array([9, 9, 8])))
    reply = Segment("assistant", "speech", text=VOCAB.text_id(np.array([5, 6])),
                    units=VOCAB.unit_id(np.array([1, 2, 3, 4])))
    speaking, writing = (TextDriven(upsample=2, speech_targets=s).layout([question, reply], VOCAB)
                         for s in (True, False))
    np.testing.assert_array_equal(writing.tokens[0], speaking.tokens[0])
    np.testing.assert_array_equal(writing.weights[0], speaking.weights[0])
    assert speaking.weights[1:].sum() == 2 * 2  # two states, λ slots each and not writing.weights[1:].any()
    assert np.all(writing.tokens[1:] == VOCAB.pad_id)
    strategy = make_strategy(StrategyConfig("text_driven", {"speech_targets": False}), VOCAB)
    assert not strategy.speech_targets
