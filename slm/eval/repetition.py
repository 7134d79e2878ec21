"""Reward hacking watched on replies: how many repeat themselves, and how long they are.

Post-training can raise a reward by saying more (a longer reply that happens to hold the
answer) or by saying the same thing again; the speech-summarization recipe's DPO stage exists
to undo the repetition its KD stage brought. Both are read off the same replies the accuracy
is, before and after each method.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from slm.eval.spoken_qa import Answer
from slm.eval.stats import accuracy


def repeats(text: str, n: int) -> bool:
    """Whether some run of `n` words occurs twice in `text` (case-insensitive; runs may
    overlap, so "bird bird bird" repeats "bird bird")."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def reply_watch(answers: Sequence[Answer], n: int) -> dict:
    """The repetition rate (replies whose text channel repeats a word `n`-gram, with its 95%
    interval) and the mean reply length in sampled tokens (steps x streams), steps and words."""
    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else 0.0

    return {"repetition": accuracy(repeats(a.text_answer, n) for a in answers), "ngram": n,
            "reply_tokens": mean([a.tokens for a in answers]),
            "reply_steps": mean([a.steps for a in answers]),
            "reply_words": mean([len(a.text_answer.split()) for a in answers])}
