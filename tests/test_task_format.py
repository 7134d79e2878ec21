"""Task formats: Qwen-Audio tags, instructions and SRWT transcripts in the strategies that tag."""

import dataclasses

import numpy as np
import pytest

from slm.config import StrategyConfig, TaskFormatConfig
from slm.errors import ConfigError, DataError
from slm.strategies import make_strategy
from slm.strategies.base import stream_specs
from slm.strategies.chain_of_modality import ChainOfModality
from slm.strategies.tasks import (TaskFormat, task_format, task_specials, time_tokens,
                                  timed_words, with_task_tokens)
from slm.strategies.text_driven import TextDriven
from slm.types import Segment
from slm.vocab import SPECIAL_TOKENS, Vocab
from tests.test_strategy_chain import simulate

BASE = Vocab.build(text_size=30, num_units=20)
QWEN = TaskFormatConfig(style="qwen_audio", timestamps=True, time_step=0.04, max_time=2.0)
VOCAB = with_task_tokens(BASE, QWEN)
TEXT, UNITS = VOCAB.range("text"), VOCAB.range("units")
WORDS = [[0, 1], [2], [3, 4]]  # text piece indices of three words
TIMES = np.array([[0.11, 0.41], [0.45, 0.61], [0.71, 1.23]], np.float32)


def flat_ids(strategy, vocab=VOCAB):
    """The flat id of each local index of the strategy's first stream."""
    stream = stream_specs(strategy, vocab)[0]
    return np.concatenate([np.arange(a, b) for a, b in stream.spans])


def asr_pair(vocab=VOCAB, times=TIMES):
    text = vocab.text_id(np.array([p for w in WORDS for p in w]))
    return [Segment("user", "speech", units=vocab.unit_id(np.array([3, 5, 7]))),
            Segment("assistant", "text", text=text, word_ends=np.cumsum([len(w) for w in WORDS]),
                    word_times=times)]


def test_the_default_format_leaves_vocabulary_and_layout_unchanged():
    assert task_specials(TaskFormatConfig()) == ()
    assert with_task_tokens(BASE, TaskFormatConfig()) is BASE
    grid = ChainOfModality("transcribe", TaskFormat()).layout(asr_pair(BASE), BASE)
    assert BASE.render(grid.tokens[0]).split() == (
        "<bos> [Human] <sosp> [Hu3] [Hu5] [Hu7] <eosp> <eoh> [Assistant] <|transcribe|> "
        "<t0> <t1> <t2> <t3> <t4> <eoa> <eos>").split()  # word times unused


def test_time_tokens_and_the_grown_vocabulary():
    assert time_tokens(QWEN)[:3] == ("<|0.00|>", "<|0.04|>", "<|0.08|>")
    assert time_tokens(QWEN)[-1] == "<|2.00|>" and len(time_tokens(QWEN)) == 51
    assert time_tokens(dataclasses.replace(QWEN, time_step=0.025))[1] == "<|0.025|>"
    assert VOCAB.specials[:len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert len(VOCAB.specials) == len(SPECIAL_TOKENS) + 6 + 51  # 5 Qwen tags, <|en|>, times
    assert VOCAB.range("text").size == TEXT.size and VOCAB.range("units").size == UNITS.size
    assert with_task_tokens(VOCAB, QWEN) is VOCAB  # a vocabulary that has them keeps them


def test_qwen_audio_tags_and_an_srwt_transcript_round_trip_through_chain_of_modality():
    strategy = ChainOfModality("transcribe", task_format(QWEN, VOCAB))
    segments = asr_pair()
    grid = strategy.layout(segments, VOCAB)
    assert VOCAB.render(grid.tokens[0]).split() == (
        "<bos> [Human] <sosp> [Hu3] [Hu5] [Hu7] <eosp> <eoh> [Assistant] <|startoftranscript|> "
        "<|en|> <|transcribe|> <|en|> <|timestamps|> <|0.12|> <t0> <t1> <|0.40|> <|0.44|> <t2> "
        "<|0.60|> <|0.72|> <t3> <t4> <|1.24|> <eoa> <eos>").split()
    prompt = strategy.prompt(segments[:1], VOCAB)
    n = prompt.steps
    np.testing.assert_array_equal(grid.tokens[:, :n], prompt.tokens)
    assert np.all(grid.weights[0, :n] == 0) and np.all(grid.weights[0, n:] == 1)
    back = strategy.unlayout(grid, VOCAB)
    assert back[1].modality == "text"
    np.testing.assert_array_equal(back[1].text, segments[1].text)  # time tokens are not text
    rule = strategy.policy(VOCAB).rules[0]  # the policy lets the sampler write it
    phases = simulate(rule, flat_ids(strategy), grid.tokens[0, n:-1])
    assert rule.final[phases[-1]]


def test_srwt_decodes_to_the_same_words_and_times_within_one_step():
    fmt = task_format(QWEN, VOCAB)
    _, reply = asr_pair()
    ids = fmt.transcript(reply.text, reply.word_ends, reply.word_times, VOCAB)
    words = timed_words(ids, VOCAB)
    assert [VOCAB.local("text", w.text).tolist() for w in words] == WORDS
    got = np.array([[w.start, w.end] for w in words])
    assert np.abs(got - TIMES).max() <= QWEN.time_step / 2 + 1e-6
    late = fmt.transcript(reply.text, reply.word_ends, TIMES + 5.0, VOCAB)  # past max_time
    assert timed_words(late, VOCAB)[-1].end == QWEN.max_time


def test_analysis_tags_for_a_spoken_question_and_none_for_a_written_one():
    strategy = ChainOfModality("answer", task_format(QWEN, VOCAB))
    spoken = strategy.prompt([Segment("user", "speech", units=UNITS.start + np.arange(2))], VOCAB)
    assert VOCAB.render(spoken.tokens[0]).split()[-6:] == (
        "[Assistant] <|startofanalysis|> <|en|> <|question-answer|> <|en|> <|notimestamps|>").split()
    written = strategy.prompt([Segment("user", "text", text=TEXT.start + np.arange(2))], VOCAB)
    assert VOCAB.render(written.tokens[0]).split()[-1] == "[Assistant]"
    reply = Segment("assistant", "speech", text=TEXT.start + np.arange(2), units=UNITS.start + np.arange(3))
    user = Segment("user", "speech", text=TEXT.start + np.arange(1), units=UNITS.start + np.arange(2))
    back = strategy.unlayout(strategy.layout([user, reply], VOCAB), VOCAB)
    assert back[0].same(user) and back[1].same(reply)


class Letters:
    """A text tokenizer of one piece per letter (`a` = piece 0), enough to write prompts."""

    def encode(self, text):
        return [ord(c) % 26 for c in text.lower() if c.isalpha()]


def test_instruction_prompts_are_text_and_read_back_in_text_driven():
    cfg = TaskFormatConfig(style="instruction")
    vocab = with_task_tokens(BASE, cfg)
    assert vocab is BASE  # instructions are text: no new specials
    strategy = TextDriven("transcribe", task_format=task_format(cfg, vocab, Letters()))
    segments = asr_pair(vocab)
    grid = strategy.layout(segments, vocab)
    prompt = strategy.prompt(segments[:1], vocab)
    instruction = vocab.text_id(np.array(Letters().encode("Transcribe the speech.")))
    np.testing.assert_array_equal(prompt.tokens[0, -len(instruction):], instruction)
    back = strategy.unlayout(grid, vocab)
    np.testing.assert_array_equal(back[1].text, segments[1].text)  # the instruction is not reply
    with pytest.raises(ConfigError, match="text tokenizer"):
        TextDriven("transcribe", task_format=task_format(cfg, vocab)).prompt(segments[:1], vocab)


def test_text_driven_writes_timed_transcripts_under_its_policy():
    strategy = TextDriven("transcribe", task_format=task_format(QWEN, VOCAB))
    segments = asr_pair()
    grid = strategy.layout(segments, VOCAB)
    n = strategy.prompt(segments[:1], VOCAB).steps
    words = timed_words(grid.tokens[0, n:], VOCAB)
    assert [VOCAB.local("text", w.text).tolist() for w in words] == WORDS
    rule = strategy.policy(VOCAB).rules[0]
    phases = simulate(rule, flat_ids(strategy), grid.tokens[0, n:-1])
    assert rule.final[phases[-1]]


def test_bad_formats_are_named():
    with pytest.raises(ConfigError, match="task_format.style"):
        task_specials(TaskFormatConfig(style="whisper"))
    with pytest.raises(ConfigError, match="time_step"):
        task_specials(TaskFormatConfig(timestamps=True, time_step=0.0125))
    with pytest.raises(ConfigError, match="does not tag tasks"):
        make_strategy(StrategyConfig(name="parallel", task_format=QWEN), VOCAB)
    with pytest.raises(ConfigError, match="strategy.task_format"):
        make_strategy(StrategyConfig(name="chain_of_modality", options={"task_format": {}}), VOCAB)
    user, reply = asr_pair()
    untimed = dataclasses.replace(reply, word_times=None)
    with pytest.raises(DataError, match="word alignments"):
        ChainOfModality("transcribe", task_format(QWEN, VOCAB)).layout([user, untimed], VOCAB)


def test_make_strategy_sets_the_format_and_the_task_per_data_task():
    strategy = make_strategy(StrategyConfig(name="chain_of_modality", task_format=QWEN), VOCAB,
                             data_task="asr")
    assert strategy.task == "transcribe" and strategy.format.cfg == QWEN
