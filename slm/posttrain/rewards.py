"""Rule rewards of rollouts, by name (`posttrain.reward`), read from the text channel.

Rewards come from what the reply wrote, not from what it said: hearing a spoken reply needs
speech synthesis and a recognizer per rollout (`slm.eval.judge`), far slower than the
rollout itself. The answer check is the closed world's one rule (`answer_is_correct`), which
is also what every rollout's accuracy reports, whichever reward trains.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from slm.data.closed_world import QA, answer_is_correct
from slm.registry import Registry
from slm.reply import turn_text
from slm.strategies.base import Strategy, assistant_turn
from slm.text.tokenizer import TextTokenizer
from slm.types import Grid
from slm.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class Replied:
    """What a reward sees of one rollout."""

    text: str  # the reply's text channel
    tokens: np.ndarray  # the reply grid [K, steps] in flat ids, up to the reply's end
    qa: QA  # the question and its expected answer


Reward = Callable[[Replied], float]
REWARDS: Registry[Reward] = Registry("reward", "slm.rewards", "posttrain.reward",
                                     "slm.posttrain.rewards.register_reward")


def register_reward(name: str, reward: Reward) -> None:
    """Make `posttrain.reward: <name>` usable."""
    REWARDS.register(name, reward)


def answer(replied: Replied) -> float:
    """1 when the reply wrote exactly the expected answer, else 0."""
    return float(answer_is_correct(replied.text, replied.qa))


register_reward("answer", answer)


@dataclasses.dataclass
class Scores:
    rewards: np.ndarray  # float [B]
    correct: np.ndarray  # bool [B]: the answer check, whatever the reward

    def summary(self, length_b) -> dict[str, float]:
        """What a step reports of its rollouts: mean reward, answer accuracy, reply steps."""
        return {"reward": float(self.rewards.mean()), "accuracy": float(self.correct.mean()),
                "reply_steps": float(np.mean(jax.device_get(length_b)))}


class Scorer:
    """Reads each rollout's reply back through its strategy and scores it."""

    def __init__(self, reward: str, strategy: Strategy, vocab: Vocab, text: TextTokenizer):
        self.reward = REWARDS[reward]
        self.strategy, self.vocab, self.text = strategy, vocab, text

    def __call__(self, prompts: Sequence[Grid], replies: Sequence[np.ndarray],
                 questions: Sequence[QA]) -> Scores:
        rewards, correct = [], []
        for prompt, reply_kt, qa in zip(prompts, replies, questions):
            reply = Grid(reply_kt, np.zeros(reply_kt.shape, np.float32))
            text = turn_text(assistant_turn(self.strategy, prompt, reply, self.vocab), self.vocab,
                             self.text)
            rewards.append(self.reward(Replied(text, reply_kt, qa)))
            correct.append(answer_is_correct(text, qa))
        return Scores(np.array(rewards, np.float32), np.array(correct, bool))
