"""A closed world small enough to learn on a CPU, whose answers a program can check.

Everything is lower-case words from `LEXICON`, without punctuation or digits, so espeak-ng
speaks every word as written and a transcript can be compared word by word. There are
questions (spoken arithmetic on small numbers, and look-ups in a fixed table of facts), plain
sentences from a small grammar for speech recognition and synthesis, and text-only lines that
state the same facts, so a model can learn the world from text and be asked about it by voice.
Every generator is a pure function of the numpy Generator it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
           "seventeen", "eighteen", "nineteen", "twenty")
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b,
              "times": lambda a, b: a * b}
# Operands stay small (65 calculations) so the held-out questions ask sums that training also
# asked, in other voices: what a held-out question tests is hearing a new voice, not doing
# arithmetic a tiny model never saw. With operands up to twenty, held-out sums were mostly
# unseen and a tiny model answered none of them.
MAX_OPERAND = 4
ARITHMETIC_TEMPLATES = ("what is {}", "how much is {}")


@dataclass(frozen=True)
class Fact:
    """A question with a one-word answer, and the same knowledge as a statement."""

    question: str
    answer: str
    statement: str


def _facts() -> tuple[Fact, ...]:
    colors = [("the sky", "blue"), ("the grass", "green"), ("snow", "white"),
              ("the sun", "yellow"), ("coal", "black"), ("blood", "red"),
              ("a banana", "yellow"), ("a carrot", "orange")]
    capitals = [("france", "paris"), ("germany", "berlin"), ("italy", "rome"),
                ("spain", "madrid"), ("japan", "tokyo"), ("england", "london"),
                ("egypt", "cairo"), ("russia", "moscow"), ("greece", "athens"),
                ("norway", "oslo")]
    legs = [("a spider", "eight"), ("a dog", "four"), ("a bird", "two"), ("a fish", "zero")]
    sounds = [("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow")]
    opposites = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night")]
    return tuple(
        [Fact(f"what color is {thing}", color, f"{thing} is {color}") for thing, color in colors]
        + [Fact(f"what is the capital of {land}", city, f"the capital of {land} is {city}")
           for land, city in capitals]
        + [Fact(f"how many legs does {animal} have", n, f"{animal} has {n} legs")
           for animal, n in legs]
        + [Fact(f"what does {animal} say", sound, f"{animal} says {sound}")
           for animal, sound in sounds]
        + [Fact(f"what is the opposite of {word}", other, f"the opposite of {word} is {other}")
           for word, other in opposites]
        + [Fact("how many days are in a week", "seven", "a week has seven days"),
           Fact("what do bees make", "honey", "bees make honey")])


FACTS = _facts()

# The sentence grammar; nouns and adjectives start with a consonant so "a" always fits.
DETERMINERS = ("the", "a", "my", "this")
ADJECTIVES = ("big", "small", "red", "blue", "green", "happy", "little", "warm", "brown")
ACTORS = ("dog", "cat", "bird", "man", "woman", "girl", "boy", "horse")
THINGS = ("ball", "book", "cup", "box", "hat", "car", "bed", "kite")
PLACES = ("garden", "house", "park", "river", "field", "kitchen")
INTRANSITIVE = ("runs", "sleeps", "sings", "sits", "walks", "jumps", "plays")
TRANSITIVE = ("sees", "likes", "finds", "takes", "wants", "holds")
PREPOSITIONS = ("near", "by", "behind")  # not "in": espeak says "in the" as one word


@dataclass(frozen=True)
class QA:
    """A question, its one-word answer, and which generator made it."""

    question: str
    answer: str
    kind: Literal["arithmetic", "fact"]


def arithmetic_question(rng: np.random.Generator) -> QA:
    """"what is three plus four" -> "seven"."""
    expression, result = _calculation(rng)
    return QA(_pick(rng, ARITHMETIC_TEMPLATES).format(expression), result, "arithmetic")


def fact_question(rng: np.random.Generator) -> QA:
    fact = FACTS[rng.integers(len(FACTS))]
    return QA(fact.question, fact.answer, "fact")


def question(rng: np.random.Generator) -> QA:
    """Arithmetic or a fact, half and half."""
    return arithmetic_question(rng) if rng.random() < 0.5 else fact_question(rng)


def sentence(rng: np.random.Generator) -> str:
    """A 4-10 word sentence: someone does something, maybe to something, maybe somewhere."""
    words = _noun_phrase(rng, ACTORS)
    if rng.random() < 0.5:
        words += [_pick(rng, INTRANSITIVE)]
    else:
        words += [_pick(rng, TRANSITIVE)] + _noun_phrase(rng, THINGS + ACTORS)
    if len(words) < 4 or rng.random() < 0.5:
        words += [_pick(rng, PREPOSITIONS), _pick(rng, ("the", "a", "my")), _pick(rng, PLACES)]
    return " ".join(words)


def text_line(rng: np.random.Generator) -> str:
    """A line of the text-only corpus: a sentence, a fact, or a sum, stated."""
    roll = rng.random()
    if roll < 0.5:
        return sentence(rng)
    if roll < 0.75:
        return FACTS[rng.integers(len(FACTS))].statement
    expression, result = _calculation(rng)
    return f"{expression} is {result}"


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation, as spoken answers are compared."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return kept.split()


def answer_is_correct(answer_text: str, qa: QA) -> bool:
    """True when the answer is exactly the expected word, whatever the case, spacing or
    punctuation around it."""
    return normalize(answer_text) == [qa.answer]


def _calculation(rng: np.random.Generator) -> tuple[str, str]:
    """("three plus four", "seven"): operands up to MAX_OPERAND, results within zero..twenty."""
    op = _pick(rng, tuple(OPERATIONS))
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
             if 0 <= OPERATIONS[op](a, b) < len(NUMBERS)]
    a, b = pairs[rng.integers(len(pairs))]
    return f"{NUMBERS[a]} {op} {NUMBERS[b]}", NUMBERS[OPERATIONS[op](a, b)]


def _noun_phrase(rng: np.random.Generator, nouns: tuple[str, ...]) -> list[str]:
    adjective = [_pick(rng, ADJECTIVES)] if rng.random() < 0.6 else []
    return [_pick(rng, DETERMINERS)] + adjective + [_pick(rng, nouns)]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _lexicon() -> frozenset[str]:
    texts = [*NUMBERS, *OPERATIONS, *ARITHMETIC_TEMPLATES, *DETERMINERS, *ADJECTIVES, *ACTORS,
             *THINGS, *PLACES, *INTRANSITIVE, *TRANSITIVE, *PREPOSITIONS, "is"]
    texts += [text for fact in FACTS for text in (fact.question, fact.answer, fact.statement)]
    return frozenset(word for text in texts for word in text.split() if "{" not in word)


LEXICON: frozenset[str] = _lexicon()
