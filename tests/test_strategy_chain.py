"""Chain of modality: exact round trips per task, the rendered templates, weights, the policy."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from slm.errors import ConfigError, DataError, VocabError
from slm.strategies.base import stream_specs
from slm.strategies.chain_of_modality import ChainOfModality
from slm.strategies.policy import StreamRule
from slm.types import Segment
from slm.vocab import Vocab

VOCAB = Vocab.build(text_size=30, num_units=20)
TEXT, UNITS = VOCAB.range("text"), VOCAB.range("units")
TASKS = ("answer", "transcribe", "tts")


def simulate(rule: StreamRule, flat_ids, tokens) -> list[int]:
    """Run `rule`'s phase machine over sampled flat `tokens`, as the jitted sampler would.

    `flat_ids[i]` is the flat id of local head index i (the stream's spans concatenated).
    Asserts every token is allowed in the phase it is sampled in; returns the phase after each.
    """
    local = {int(flat): i for i, flat in enumerate(flat_ids)}
    phase, phases = rule.start, []
    for t, token in enumerate(int(x) for x in tokens):
        assert token in local, f"step {t}: id {token} is not in the stream"
        assert rule.allowed[phase, local[token]], f"step {t}: id {token} not allowed in phase {phase}"
        phase = int(rule.next_phase[phase, local[token]])
        phases.append(phase)
    return phases


def flat_ids(strategy):
    (stream,) = stream_specs(strategy, VOCAB)
    return np.concatenate([np.arange(a, b) for a, b in stream.spans])


def ids(token_range, n, offset=0):
    return np.arange(token_range.start + offset, token_range.start + offset + n, dtype=np.int32)


def ids_in(token_range, min_size=0, max_size=8):
    return st.lists(st.integers(token_range.start, token_range.stop - 1),
                    min_size=min_size, max_size=max_size).map(lambda x: np.array(x, np.int32))


@st.composite
def dialogues(draw, task):
    segments = []
    for _ in range(draw(st.integers(1, 3))):
        user = {"answer": draw(st.sampled_from(["text", "speech"])), "transcribe": "speech",
                "tts": "text"}[task]
        reply = "text" if task == "transcribe" else "speech"
        if user == "text":
            segments.append(Segment("user", "text", text=draw(ids_in(TEXT))))
        else:  # the answer chain writes the transcript; ASR's transcript is the reply
            transcript = draw(ids_in(TEXT)) if task == "answer" else None
            segments.append(Segment("user", "speech", text=transcript, units=draw(ids_in(UNITS))))
        text = None if task == "tts" else draw(ids_in(TEXT))
        units = draw(ids_in(UNITS)) if reply == "speech" else None
        segments.append(Segment("assistant", reply, text=text, units=units))
    return segments


def check_round_trip(task, segments):
    strategy = ChainOfModality(task)
    grid = strategy.layout(segments, VOCAB)
    back = strategy.unlayout(grid, VOCAB)
    assert len(back) == len(segments) and all(a.same(b) for a, b in zip(back, segments))
    prompt = strategy.prompt(segments[:-1], VOCAB)
    n = prompt.tokens.shape[1]
    np.testing.assert_array_equal(grid.tokens[:, :n], prompt.tokens)
    np.testing.assert_array_equal(grid.weights[:, :n], prompt.weights)
    assert np.all(grid.weights[:, n:] == 1.0) and np.all(prompt.weights[0, -1] == 0.0)
    # a reply sampled under the policy is accepted and ends in a final phase right at <eoa>
    rule = strategy.policy(VOCAB).rules[0]
    reply = grid.tokens[0, n:-1]  # the sampler stops at <eoa>; <eos> is not sampled
    phases = simulate(rule, flat_ids(strategy), reply)
    assert rule.final[phases[-1]] and not any(rule.final[p] for p in phases[:-1])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_round_trip_prompt_prefix_and_policy_every_task(data):
    for task in TASKS:
        check_round_trip(task, data.draw(dialogues(task)))


def rendered(task, segments):
    grid = ChainOfModality(task).layout(segments, VOCAB)
    return VOCAB.render(grid.tokens[0]).split(), grid


SPEECH_Q = Segment("user", "speech", text=ids(TEXT, 2), units=ids(UNITS, 3))
SPEECH_A = Segment("assistant", "speech", text=ids(TEXT, 2, 5), units=ids(UNITS, 2, 7))


@pytest.mark.parametrize("task, segments, expected, prompt_len", [
    ("answer", [SPEECH_Q, SPEECH_A],
     "<bos> [Human] <sosp> [Hu0] [Hu1] [Hu2] <eosp> <eoh> [Assistant] <t0> <t1> [ta] <t5> <t6> "
     "[ua] <sosp> [Hu7] [Hu8] <eosp> <eoa> <eos>", 9),
    ("answer", [Segment("user", "text", text=ids(TEXT, 1, 3)), SPEECH_A],
     "<bos> [Human] <t3> <eoh> [Assistant] [ta] <t5> <t6> [ua] <sosp> [Hu7] [Hu8] <eosp> <eoa> <eos>", 5),
    ("transcribe", [Segment("user", "speech", units=ids(UNITS, 2)),
                    Segment("assistant", "text", text=ids(TEXT, 2))],
     "<bos> [Human] <sosp> [Hu0] [Hu1] <eosp> <eoh> [Assistant] <|transcribe|> <t0> <t1> <eoa> <eos>", 9),
    ("tts", [Segment("user", "text", text=ids(TEXT, 2)),
             Segment("assistant", "speech", units=ids(UNITS, 2))],
     "<bos> [Human] <t0> <t1> <eoh> [Assistant] <|tts|> <sosp> [Hu0] [Hu1] <eosp> <eoa> <eos>", 7),
])
def test_templates_weights_and_prompt(task, segments, expected, prompt_len):
    tokens, grid = rendered(task, segments)
    assert tokens == expected.split()
    weights = grid.weights[0]
    assert np.all(weights[:prompt_len] == 0.0) and np.all(weights[prompt_len:] == 1.0)
    prompt = ChainOfModality(task).prompt(segments[:1], VOCAB)
    assert VOCAB.render(prompt.tokens[0]).split() == tokens[:prompt_len]
    assert tokens[prompt_len - 1] in ("[Assistant]", "<|transcribe|>", "<|tts|>")
    check_round_trip(task, segments)


def test_policy_bans_the_wrong_modality_and_skipping_the_chain():
    strategy = ChainOfModality()
    rule, flat = strategy.policy(VOCAB).rules[0], flat_ids(strategy)
    local = {int(f): i for i, f in enumerate(flat)}
    unit, text, sp = UNITS.start, TEXT.start, VOCAB.special
    start = rule.start
    assert not rule.allowed[start, local[unit]]  # no unit during the transcript
    assert not rule.allowed[start, local[sp("<sosp>")]] and not rule.allowed[start, local[sp("<eoa>")]]
    assert rule.allowed[start, local[text]] and rule.allowed[start, local[sp("[ta]")]]
    units_phase = simulate(rule, flat, [text, sp("[ta]"), text, sp("[ua]"), sp("<sosp>")])[-1]
    assert not rule.allowed[units_phase, local[text]] and rule.allowed[units_phase, local[unit]]
    with pytest.raises(AssertionError, match="not allowed"):
        simulate(rule, flat, [text, unit])
    for task, bad in [("transcribe", unit), ("tts", text), ("tts", unit)]:
        rule = ChainOfModality(task).policy(VOCAB).rules[0]
        assert not rule.allowed[rule.start, local[bad]], (task, bad)
        assert rule.fill == VOCAB.pad_id and rule.delay == 0


def test_unlayout_of_a_prompt_and_a_cut_short_reply():
    strategy = ChainOfModality()
    prompt = strategy.prompt([SPEECH_Q], VOCAB)
    (user,) = strategy.unlayout(prompt, VOCAB)
    assert user.modality == "speech" and user.text is None
    np.testing.assert_array_equal(user.units, SPEECH_Q.units)
    grid = strategy.layout([SPEECH_Q, SPEECH_A], VOCAB)
    cut = VOCAB.render(grid.tokens[0]).split().index("[ua]")
    cut_grid = type(grid)(grid.tokens[:, :cut], grid.weights[:, :cut])
    user, reply = strategy.unlayout(cut_grid, VOCAB)
    np.testing.assert_array_equal(user.text, SPEECH_Q.text)
    assert reply.modality == "text" and np.array_equal(reply.text, SPEECH_A.text)


def test_rejects_bad_dialogues():
    with pytest.raises(ConfigError, match="task"):
        ChainOfModality("translate")
    text_user = Segment("user", "text", text=ids(TEXT, 1))
    with pytest.raises(DataError, match="alternate"):
        ChainOfModality().layout([SPEECH_A, SPEECH_Q], VOCAB)
    with pytest.raises(DataError, match="end with"):
        ChainOfModality().layout([SPEECH_Q], VOCAB)
    with pytest.raises(DataError, match="'text' view"):  # the chain needs the user's transcript
        ChainOfModality().layout([Segment("user", "speech", units=ids(UNITS, 2)), SPEECH_A], VOCAB)
    with pytest.raises(DataError, match="modalities"):  # tts reads text
        ChainOfModality("tts").prompt([SPEECH_Q], VOCAB)
    with pytest.raises(VocabError, match="units"):  # a text id where units belong
        ChainOfModality().layout([text_user, Segment("assistant", "speech", text=ids(TEXT, 1),
                                                     units=ids(TEXT, 1))], VOCAB)


def test_a_written_question_gets_a_written_reply_that_ends_after_its_text():
    strategy, sp = ChainOfModality(), VOCAB.special
    question = Segment("user", "text", text=ids(TEXT, 3))
    answer = Segment("assistant", "text", text=ids(TEXT, 2, offset=5))
    grid = strategy.layout([question, answer], VOCAB)
    assert VOCAB.render(grid.tokens[0]).split()[-3:-1] == [VOCAB.render([answer.text[-1]]), "<eoa>"]
    assert "[ua]" not in VOCAB.render(grid.tokens[0])
    user, reply = strategy.unlayout(grid, VOCAB)
    assert reply.modality == "text" and np.array_equal(reply.text, answer.text)
    rule, flat = strategy.policy(VOCAB).rules[0], flat_ids(strategy)
    phases = simulate(rule, flat, [sp("[ta]"), TEXT.start, sp("<eoa>")])
    assert rule.final[phases[-1]]  # <eoa> after the answer ends the reply
