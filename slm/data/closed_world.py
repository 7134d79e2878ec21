"""A closed world small enough to learn on a CPU, whose answers a program can check.

Everything is lower-case words from `LEXICON`, without punctuation or digits, so espeak-ng
speaks every word as written and a transcript can be compared word by word.

The world is built so a benchmark can ask what a speech+text model is for: *answering by
voice what it learned only from text*.
- Facts come in relations (colors, legs, homes, capitals, sounds, opposites). Each relation
  has several question phrasings and statements; one phrasing per relation is **held out**
  (never used anywhere in training), as is one arithmetic template.
- Each fact is **spoken** (asked and answered in speech during training) or **text-only**
  (stated and asked only in the text corpus). A text-only fact's answer is always a word the
  assistant also speaks as the answer to some spoken question, so a model *can* say it; what
  it has never heard is the fact itself. Words of text-only questions occur in spoken
  sentences, so a model can hear them, just never in that question.
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
HELDOUT_ARITHMETIC_TEMPLATES = ("tell me {}",)

Split = Literal["spoken", "text"]


@dataclass(frozen=True)
class Relation:
    """Question phrasings (`{s}`: the subject) for training and held out, and statements
    (`{a}`: the answer) for the text corpus."""

    name: str
    questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    statements: tuple[str, ...]


RELATIONS = {r.name: r for r in (
    Relation("color", ("what color is {s}", "which color is {s}", "tell me what color {s} is"),
             ("what color does {s} have",), ("{s} is {a}", "{s} has the color {a}")),
    Relation("legs", ("how many legs does {s} have", "tell me how many legs {s} has"),
             ("how many legs has {s} got",), ("{s} has {a} legs",)),
    Relation("home", ("where does {s} live", "tell me where {s} lives"),
             ("where can you find {s}",), ("{s} lives by the {a}", "you find {s} by the {a}")),
    Relation("capital", ("what is the capital of {s}", "which city is the capital of {s}"),
             ("name the capital of {s}",), ("the capital of {s} is {a}", "{a} is the capital of {s}")),
    Relation("sound", ("what does {s} say", "what sound does {s} make"),
             ("which sound does {s} make",), ("{s} says {a}",)),
    Relation("opposite", ("what is the opposite of {s}", "which word is the opposite of {s}"),
             ("tell me the opposite of {s}",), ("the opposite of {s} is {a}",)),
)}


@dataclass(frozen=True)
class Fact:
    """One piece of knowledge: a relation's subject and its one-word answer."""

    relation: str
    subject: str
    answer: str
    split: Split

    def question(self, phrasing: str) -> str:
        return phrasing.format(s=self.subject)

    @property
    def statements(self) -> tuple[str, ...]:
        return tuple(t.format(s=self.subject, a=self.answer)
                     for t in RELATIONS[self.relation].statements)


def _facts() -> tuple[Fact, ...]:
    table = {  # relation -> (subject, answer) spoken, then text-only
        "color": ([("the sky", "blue"), ("the grass", "green"), ("snow", "white"),
                   ("the sun", "yellow"), ("coal", "black"), ("blood", "red"),
                   ("a banana", "yellow"), ("a carrot", "orange"), ("a tomato", "red"),
                   ("a frog", "green")],
                  [("milk", "white"), ("a lemon", "yellow"), ("a crow", "black"),
                   ("a pumpkin", "orange"), ("a cherry", "red"), ("a leaf", "green"),
                   ("the ocean", "blue")]),
        "legs": ([("a spider", "eight"), ("a dog", "four"), ("a bird", "two"),
                  ("a fish", "zero"), ("a horse", "four")],
                 [("a cat", "four"), ("an ant", "six"), ("a duck", "two"), ("a snake", "zero"),
                  ("a cow", "four"), ("a bee", "six")]),
        "home": ([("a cow", "farm"), ("a fish", "sea"), ("a bear", "forest"), ("a pig", "farm"),
                  ("a whale", "sea"), ("a wolf", "forest")],
                 [("a sheep", "farm"), ("a shark", "sea"), ("a fox", "forest"),
                  ("a goat", "farm"), ("a crab", "sea"), ("a deer", "forest")]),
        "capital": ([("france", "paris"), ("germany", "berlin"), ("italy", "rome"),
                     ("spain", "madrid"), ("japan", "tokyo"), ("england", "london"),
                     ("egypt", "cairo"), ("russia", "moscow"), ("greece", "athens"),
                     ("norway", "oslo")], []),
        "sound": ([("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"),
                   ("a sheep", "baa")], []),
        "opposite": ([("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"),
                      ("fast", "slow"), ("old", "new")], []),
    }
    return tuple(Fact(relation, subject, answer, split)
                 for relation, (spoken, text_only) in table.items()
                 for split, pairs in (("spoken", spoken), ("text", text_only))
                 for subject, answer in pairs)


FACTS = _facts()
SPOKEN_FACTS = tuple(f for f in FACTS if f.split == "spoken")
TEXT_ONLY_FACTS = tuple(f for f in FACTS if f.split == "text")

# The sentence grammar; nouns and adjectives start with a consonant so "a" always fits.
DETERMINERS = ("the", "a", "my", "this")
ADJECTIVES = ("big", "small", "red", "blue", "green", "happy", "little", "warm", "brown")
ACTORS = ("dog", "cat", "bird", "man", "woman", "girl", "boy", "horse")
THINGS = ("ball", "book", "cup", "box", "hat", "car", "bed", "kite")
PLACES = ("garden", "house", "park", "river", "field", "kitchen")
INTRANSITIVE = ("runs", "sleeps", "sings", "sits", "walks", "jumps", "plays")
TRANSITIVE = ("sees", "likes", "finds", "takes", "wants", "holds")
PREPOSITIONS = ("near", "by", "behind")  # not "in": espeak says "in the" as one word
# ("of a" is avoided everywhere: espeak says it as one word.)
# Every subject and answer of the world, as sentences mention them: the words of every
# question (text-only ones included) are heard in speech, outside any question.
WORLD_NOUNS = tuple(sorted({f.subject for f in FACTS} | {f.answer for f in FACTS}))


@dataclass(frozen=True)
class QA:
    """A question, its one-word answer, and which generator made it."""

    question: str
    answer: str
    kind: Literal["arithmetic", "fact"]


# --- Question sets: what training asks, and what each held-out test set asks ------------------

def arithmetic_question(rng: np.random.Generator, heldout: bool = False) -> QA:
    """"what is three plus four" -> "seven" (a held-out template with `heldout`)."""
    expression, result = _calculation(rng)
    templates = HELDOUT_ARITHMETIC_TEMPLATES if heldout else ARITHMETIC_TEMPLATES
    return QA(_pick(rng, templates).format(expression), result, "arithmetic")


def fact_question(rng: np.random.Generator, facts: tuple[Fact, ...] = SPOKEN_FACTS,
                  heldout: bool = False) -> QA:
    """A fact asked in a training phrasing, or in its relation's held-out one."""
    fact = facts[rng.integers(len(facts))]
    relation = RELATIONS[fact.relation]
    phrasings = relation.heldout_questions if heldout else relation.questions
    return QA(fact.question(_pick(rng, phrasings)), fact.answer, "fact")


def question(rng: np.random.Generator) -> QA:
    """A spoken training question: arithmetic or a spoken fact, half and half, phrased as in
    training. The `voices` test set asks the same kind in voices training never heard."""
    return arithmetic_question(rng) if rng.random() < 0.5 else fact_question(rng)


def heldout_phrasing_question(rng: np.random.Generator) -> QA:
    """Arithmetic or a spoken fact in a phrasing no training example uses."""
    return (arithmetic_question(rng, heldout=True) if rng.random() < 0.5
            else fact_question(rng, heldout=True))


def transfer_question(rng: np.random.Generator) -> QA:
    """A text-only fact (never in speech during training), asked in a training phrasing."""
    return fact_question(rng, TEXT_ONLY_FACTS)


TEST_SETS = {"voices": question, "phrasings": heldout_phrasing_question,
             "transfer": transfer_question}
"""Spoken held-out test sets; all of them are asked in voices training never heard."""


def text_question(rng: np.random.Generator) -> QA:
    """A question of the text corpus: arithmetic or any fact (spoken or text-only), phrased
    as in training. This is where text-only facts are asked at all."""
    return arithmetic_question(rng) if rng.random() < 0.3 else fact_question(rng, FACTS)


# --- Text and sentences -------------------------------------------------------------------------

def sentence(rng: np.random.Generator) -> str:
    """A 3-10 word sentence: someone does something, maybe to something, maybe somewhere; a
    quarter of them mention a thing of the world (`WORLD_NOUNS`)."""
    words = _noun_phrase(rng, ACTORS)
    roll = rng.random()
    if roll < 0.25:
        return " ".join(words + [_pick(rng, TRANSITIVE), _pick(rng, WORLD_NOUNS)])
    if roll < 0.6:
        words += [_pick(rng, INTRANSITIVE)]
    else:
        words += [_pick(rng, TRANSITIVE)] + _noun_phrase(rng, THINGS + ACTORS)
    if len(words) < 4 or rng.random() < 0.5:
        words += [_pick(rng, PREPOSITIONS), _pick(rng, ("the", "a", "my")), _pick(rng, PLACES)]
    return " ".join(words)


def text_line(rng: np.random.Generator) -> str:
    """A line of the text-only corpus: a sentence, a fact stated (any fact, in any of its
    relation's statements), or a sum stated."""
    roll = rng.random()
    if roll < 0.4:
        return sentence(rng)
    if roll < 0.8:
        return _pick(rng, FACTS[rng.integers(len(FACTS))].statements)
    expression, result = _calculation(rng)
    return f"{expression} is {result}"


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation, as spoken answers are compared."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return kept.split()


def answer_is_correct(answer_text: str, qa: QA) -> bool:
    """True when the answer is exactly the expected word, whatever the case, spacing or
    punctuation around it. The one rule for written and (transcribed) spoken answers."""
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
    texts = [*NUMBERS, *OPERATIONS, *ARITHMETIC_TEMPLATES, *HELDOUT_ARITHMETIC_TEMPLATES,
             *DETERMINERS, *ADJECTIVES, *ACTORS, *THINGS, *PLACES, *INTRANSITIVE, *TRANSITIVE,
             *PREPOSITIONS, *WORLD_NOUNS, "is"]
    for relation in RELATIONS.values():
        texts += [*relation.questions, *relation.heldout_questions, *relation.statements]
    return frozenset(word for text in texts for word in text.split() if "{" not in word)


LEXICON: frozenset[str] = _lexicon()
