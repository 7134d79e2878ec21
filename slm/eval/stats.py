"""Intervals and chance levels: every accuracy is reported with both.

Wilson's score interval rather than the normal one: test sets here are a few hundred
questions and accuracies sit near 0 or 1, where the normal interval leaves [0, 1] and is too
narrow.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion; (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    center = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, center - half), min(1.0, center + half)


def accuracy(hits: Iterable[bool]) -> dict:
    """{"accuracy", "low", "high", "n"}: a proportion with its 95% interval."""
    hits = list(hits)
    k, n = sum(bool(h) for h in hits), len(hits)
    low, high = wilson(k, n)
    return {"accuracy": k / n if n else 0.0, "low": low, "high": high, "n": n}


def chance(answers: Iterable[str]) -> dict:
    """What a model that never hears the question can score against these expected answers:
    `majority` by always giving the most common answer, `matched` by guessing answers as often
    as they occur (the expected score of a shuffled-question control)."""
    counts = Counter(answers)
    total = sum(counts.values())
    if not total:
        return {"majority": 0.0, "matched": 0.0}
    return {"majority": max(counts.values()) / total,
            "matched": sum((c / total) ** 2 for c in counts.values())}


def difference(a: dict, b: dict) -> dict:
    """a - b of two `accuracy` results, with Newcombe's hybrid score interval (his method 10,
    built from the two Wilson intervals). It treats the samples as independent; asked of the
    same questions, the two are usually positively correlated, and the interval is then wider
    than it need be: a difference it excludes from 0 is real."""
    d = a["accuracy"] - b["accuracy"]
    low = d - math.hypot(a["accuracy"] - a["low"], b["high"] - b["accuracy"])
    high = d + math.hypot(a["high"] - a["accuracy"], b["accuracy"] - b["low"])
    return {"difference": d, "low": low, "high": high}
