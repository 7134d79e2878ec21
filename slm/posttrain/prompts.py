"""The questions post-training asks: the spoken dialogues of `data.dir`, in a keyed order.

The order is a pure function of the seed and the step (one permutation per epoch, as
Levanter orders its data), so a resumed run asks exactly the questions the uninterrupted one
would have without reading anything back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from slm.config import Config
from slm.data import records
from slm.data.closed_world import QA
from slm.data.examples import speech_segment, text_segment
from slm.data.tokenizers import load_text
from slm.errors import ConfigError
from slm.strategies.base import Strategy
from slm.strategies.hearing import Hearing
from slm.text.tokenizer import TextTokenizer
from slm.types import Grid, Segment
from slm.vocab import Vocab


@dataclasses.dataclass
class Prompt:
    grid: Grid  # the student's prompt: the spoken question as it hears it, then its turn
    question: dict  # the question's token record (tokenizer-local text ids), for a reader
    qa: QA

    def written(self, vocab: Vocab) -> Segment:
        """The question's transcript as a written user turn in `vocab`'s ids (a text
        teacher's input)."""
        return text_segment(self.question, vocab, "user")


def keyed_order(seed: int, count: int, step: int, per_step: int) -> np.ndarray:
    """Indices (of `count` items) used at `step` (1-based), `per_step` a step, each epoch in
    its own seeded permutation."""
    positions = np.arange((step - 1) * per_step, step * per_step)
    orders = {e: np.random.default_rng([seed, e]).permutation(count)
              for e in np.unique(positions // count)}
    return np.array([orders[p // count][p % count] for p in positions])


def text_tokenizer(config: Config) -> TextTokenizer:
    if not config.tokenizers.dir:
        raise ConfigError("post-training reads replies' text: set tokenizers.dir (the "
                          "tokenizers the model was trained with)")
    return load_text(config.tokenizers.dir)


class Prompts:
    """`per_step` questions for each step, each epoch in a new seeded order."""

    def __init__(self, config: Config, vocab: Vocab, strategy: Strategy, hearing: Hearing,
                 text: TextTokenizer):
        if config.data.source != "records" or not config.data.dir:
            raise ConfigError("post-training asks the spoken dialogues of tokenized shards: set "
                              "data.source=records and data.dir (the output of `slm tokenize`)")
        self.split = f"{config.posttrain.split}-dialogues"
        self.source = records.data_source(Path(config.data.dir), self.split)
        self.count = len(self.source)
        self.per_step, self.seed = config.posttrain.prompts, config.seed
        self.vocab, self.strategy, self.hearing, self.text = vocab, strategy, hearing, text

    def batch(self, step: int) -> list[Prompt]:
        indices = keyed_order(self.seed, self.count, step, self.per_step)
        return [self.prompt(records.decode(self.source[int(i)])) for i in indices]

    def prompt(self, record: dict) -> Prompt:
        heard = speech_segment(record["question"], self.vocab, "user", self.hearing)
        # as a spoken question reaches the model at inference (`Speaker.spoken_turn`): sound only
        heard = dataclasses.replace(heard, text=None, word_ends=None, word_times=None)
        grid = self.hearing.attach(self.strategy.prompt([heard], self.vocab), [heard], self.vocab)
        question = self.text.decode(np.asarray(record["question"]["text_ids"]).tolist())
        return Prompt(grid, record["question"], QA(question, record["answer_text"],
                                                   record.get("qa_kind", "")))
