"""One flat token-id space made of named, contiguous ranges.

Specials, text pieces, semantic units and acoustic codebooks each own a slice of
the id space, so model heads and sampling masks are just slices of ranges. The
vocabulary is data: it is saved as JSON beside every checkpoint and checked on
load, because a model fed ids from a different tokenizer fails silently.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slm.errors import VocabError

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>", "<unk>", "[Text]", "[Speech]", "<sosp>", "<eosp>",
    "<text_pad>", "<text_epad>", "[Human]", "[Assistant]", "<eoh>", "<eoa>", "[ta]", "[ua]",
    "<|transcribe|>", "<|tts|>", "<|answer|>", "<|continue|>", "<|audio|>",
)

_FORMAT = "slm.vocab/1"
_NUM = r"(0|[1-9][0-9]*)"  # no leading zeros, so each id has exactly one spelling
_GENERATED = re.compile(rf"<t{_NUM}>|\[Hu{_NUM}\]|\[Ac{_NUM}_{_NUM}\]|<reserved{_NUM}>")
_FIX = "use the tokenizers the checkpoint was trained with, or re-train/convert the checkpoint"


def _kind_of_name(name: str) -> str | None:
    """The kind a range name implies; names are fixed so strings can be parsed back."""
    if re.fullmatch(rf"ac{_NUM}", name):
        return "acoustic"
    return {"specials": "special", "text": "text", "units": "units", "reserved": "reserved"}.get(name)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _checked(values: Any, lo: int, hi: int, what: str) -> np.ndarray:
    """`values` as an int64 array, after checking that every entry lies in [lo, hi)."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        raise VocabError(f"{what} must be an integer, got {values!r}")
    arr = arr.astype(np.int64)
    bad = (arr < lo) | (arr >= hi)
    if bad.any():
        raise VocabError(f"{what} must be in [{lo}, {hi}), got {int(arr.flat[np.argmax(bad)])}")
    return arr


def _scalar_or_array(arr: np.ndarray) -> int | np.ndarray:
    return int(arr) if arr.ndim == 0 else arr.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TokenRange:
    """A named half-open slice [start, stop) of the id space."""

    name: str
    kind: str
    start: int
    size: int

    def __post_init__(self) -> None:
        expected = _kind_of_name(self.name)
        if expected is None:
            raise VocabError(f"unknown range name {self.name!r}; use specials, text, units, ac<q> or reserved")
        if self.kind != expected:
            raise VocabError(f"range {self.name!r} must have kind {expected!r}, got {self.kind!r}")
        if not (_is_int(self.start) and _is_int(self.size)) or self.start < 0 or self.size < 1:
            raise VocabError(f"range {self.name!r} needs integer start >= 0 and size >= 1, "
                             f"got start={self.start!r} size={self.size!r}")
        object.__setattr__(self, "start", int(self.start))  # numpy ints would not serialize to JSON
        object.__setattr__(self, "size", int(self.size))

    @property
    def stop(self) -> int:
        return self.start + self.size

    def __contains__(self, token_id: int) -> bool:
        return self.start <= token_id < self.stop

    def __str__(self) -> str:
        return f"{self.name!r} [{self.start}, {self.stop})"


def _index_ranges(ranges: tuple[TokenRange, ...]) -> dict[str, TokenRange]:
    """Ranges by name, after checking they tile [0, size) with no gap or overlap."""
    by_name: dict[str, TokenRange] = {}
    prev = None
    for r in ranges:
        if r.name in by_name:
            raise VocabError(f"duplicate range name {r.name!r}")
        expected = prev.stop if prev else 0
        if r.start != expected:
            problem = "overlaps" if r.start < expected else "leaves a gap after"
            after = f"{problem} range {prev}" if prev else "is first"
            raise VocabError(f"range {r} {after}; ranges must tile the ids from 0 (expected start {expected})")
        by_name[r.name], prev = r, r
    codebooks = [r.name for r in ranges if r.kind == "acoustic"]
    if codebooks != [f"ac{q}" for q in range(len(codebooks))]:
        raise VocabError(f"acoustic ranges must be ac0..ac{len(codebooks) - 1} in order, got {codebooks}")
    if "specials" not in by_name:
        raise VocabError(f"a vocabulary needs a 'specials' range, got {list(by_name)}")
    return by_name


def _piece_strings(pieces: tuple[str, ...], specials: tuple[str, ...]) -> tuple[str, ...]:
    """How each text piece prints. SentencePiece vocabularies contain pieces like
    '<unk>' or duplicates; those print as <tN> so strings stay one-to-one with ids."""
    counts = collections.Counter(pieces)
    taken = set(specials)
    return tuple(p if counts[p] == 1 and p not in taken and not _GENERATED.fullmatch(p) else f"<t{i}>"
                 for i, p in enumerate(pieces))


def _difference(what: str, here: Sequence[str] | None, there: Sequence[str] | None, where: str) -> str:
    """One line saying where two token lists first disagree."""
    if here is None or there is None:
        return f"{what}: {_count(here)} here vs {_count(there)} in {where}"
    i = next((i for i, (a, b) in enumerate(zip(here, there)) if a != b), min(len(here), len(there)))
    return f"{what} differ at index {i}: {_entry(here, i)} here vs {_entry(there, i)} in {where}"


def _count(seq: Sequence[str] | None) -> str:
    return "none" if seq is None else f"{len(seq)} entries"


def _entry(seq: Sequence[str], i: int) -> str:
    return repr(seq[i]) if i < len(seq) else "end of list"


def _span(r: TokenRange | None) -> str:
    return f"start={r.start} size={r.size}" if r else "absent"


class Vocab:
    """The id space: validated ranges plus the strings that name specials and text pieces."""

    def __init__(self, ranges: Sequence[TokenRange], specials: Sequence[str],
                 text_pieces: Sequence[str] | None = None):
        self.ranges = tuple(ranges)
        self.specials = tuple(specials)
        self.text_pieces = None if text_pieces is None else tuple(text_pieces)
        self._by_name = _index_ranges(self.ranges)
        self._check_strings()
        self.size = self.ranges[-1].stop
        self.num_codebooks = sum(r.kind == "acoustic" for r in self.ranges)
        self._starts = [r.start for r in self.ranges]
        self._special_ids = {s: self.range("specials").start + i for i, s in enumerate(self.specials)}
        self._piece_strings = None if self.text_pieces is None else _piece_strings(self.text_pieces, self.specials)
        self._piece_index = {s: i for i, s in enumerate(self._piece_strings or ())}

    def _check_strings(self) -> None:
        n = self.range("specials").size
        if len(self.specials) != n:
            raise VocabError(f"range 'specials' has size {n} but {len(self.specials)} special tokens were given")
        dupes = sorted(s for s, c in collections.Counter(self.specials).items() if c > 1)
        clashes = [s for s in self.specials if _GENERATED.fullmatch(s)]
        if dupes or clashes:
            raise VocabError(f"special tokens must be unique and unlike generated names; "
                             f"duplicates {dupes}, clashes {clashes}")
        if self.text_pieces is not None:
            size = self.range("text").size if self.has_range("text") else 0
            if len(self.text_pieces) != size:
                raise VocabError(f"range 'text' has size {size} but {len(self.text_pieces)} text pieces were given")

    @classmethod
    def build(cls, *, text_size: int, num_units: int = 0, num_codebooks: int = 0, codebook_size: int = 0,
              extra_specials: Sequence[str] = (), text_pieces: Sequence[str] | None = None,
              pad_to_multiple: int = 128) -> Vocab:
        """The standard layout; a reserved tail pads the size so embedding tables shard evenly.
        Ranges of size 0 (e.g. no units) are left out."""
        if num_codebooks < 0 or (num_codebooks and codebook_size < 1):
            raise VocabError(f"num_codebooks={num_codebooks} needs num_codebooks >= 0 and codebook_size >= 1, "
                             f"got codebook_size={codebook_size}")
        if pad_to_multiple < 1:
            raise VocabError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        specials = SPECIAL_TOKENS + tuple(extra_specials)
        layout = [("specials", "special", len(specials)), ("text", "text", text_size), ("units", "units", num_units)]
        layout += [(f"ac{q}", "acoustic", codebook_size) for q in range(num_codebooks)]
        ranges: list[TokenRange] = []
        start = 0
        for name, kind, size in layout:
            if size:
                ranges.append(TokenRange(name, kind, start, size))
                start += size
        if start % pad_to_multiple:
            ranges.append(TokenRange("reserved", "reserved", start, -start % pad_to_multiple))
        return cls(ranges, specials, text_pieces)

    def with_specials(self, extra: Sequence[str]) -> Vocab:
        """This vocabulary with `extra` specials after its own: every other range moves up
        (records keep tokenizer-local ids, so tokenized data stays valid). Only the standard
        layout of `build` can grow."""
        if self.specials[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise VocabError("only a vocabulary of slm's standard layout (Vocab.build) can take "
                             f"more specials; this one starts with {list(self.specials[:3])}")
        sizes = {name: self.range(name).size if self.has_range(name) else 0
                 for name in ("text", "units", "ac0")}
        return Vocab.build(text_size=sizes["text"], num_units=sizes["units"],
                           num_codebooks=self.num_codebooks, codebook_size=sizes["ac0"],
                           extra_specials=self.specials[len(SPECIAL_TOKENS):] + tuple(extra),
                           text_pieces=self.text_pieces)

    # --- ranges and ids -------------------------------------------------------------

    def range(self, name: str) -> TokenRange:
        if name not in self._by_name:
            raise VocabError(f"no range {name!r} in this vocabulary; known ranges: {list(self._by_name)}")
        return self._by_name[name]

    def has_range(self, name: str) -> bool:
        return name in self._by_name

    def ids(self, *range_names: str) -> np.ndarray:
        """Sorted int32 ids of the union of the named ranges, e.g. for a sampling mask."""
        parts = [np.arange(r.start, r.stop) for r in {self.range(n) for n in range_names}]
        return np.sort(np.concatenate(parts or [np.zeros(0)])).astype(np.int32)

    def special(self, name: str) -> int:
        if name not in self._special_ids:
            raise VocabError(f"unknown special token {name!r}; known specials: {list(self.specials)}")
        return self._special_ids[name]

    pad_id = property(lambda self: self.special("<pad>"), doc="Id of <pad>.")
    bos_id = property(lambda self: self.special("<bos>"), doc="Id of <bos>.")
    eos_id = property(lambda self: self.special("<eos>"), doc="Id of <eos>.")

    def _id_in(self, range_name: str, index: Any, what: str) -> int | np.ndarray:
        r = self.range(range_name)
        return _scalar_or_array(_checked(index, 0, r.size, what) + r.start)

    def text_id(self, piece_index: int) -> int:
        return self._id_in("text", piece_index, "text piece index")

    def unit_id(self, unit: int) -> int:
        return self._id_in("units", unit, "unit")

    def codebook_id(self, codebook: int, code: int) -> int:
        q = int(_checked(codebook, 0, self.num_codebooks, "codebook"))
        return self._id_in(f"ac{q}", code, f"code for codebook {q}")

    def local(self, range_name: str, token_id: Any) -> int | np.ndarray:
        """Index within the named range, e.g. a unit id back to its unit number."""
        r = self.range(range_name)
        return _scalar_or_array(_checked(token_id, r.start, r.stop, f"id in range {r.name!r}") - r.start)

    def range_of(self, token_id: int) -> TokenRange:
        tid = int(_checked(token_id, 0, self.size, "token id"))
        return self.ranges[bisect.bisect_right(self._starts, tid) - 1]

    # --- strings --------------------------------------------------------------------

    def to_string(self, token_id: int) -> str:
        r = self.range_of(token_id)
        i = int(token_id) - r.start
        if r.kind == "special":
            return self.specials[i]
        if r.kind == "text":
            return f"<t{i}>" if self._piece_strings is None else self._piece_strings[i]
        if r.kind == "units":
            return f"[Hu{i}]"
        if r.kind == "acoustic":
            return f"[Ac{r.name[2:]}_{i}]"
        return f"<reserved{i}>"

    def from_string(self, s: str) -> int:
        """Exact inverse of `to_string`: dictionary look-ups, then one regex."""
        if s in self._special_ids:
            return self._special_ids[s]
        if s in self._piece_index:
            return self.text_id(self._piece_index[s])
        m = _GENERATED.fullmatch(s)
        if m is None:
            raise VocabError(f"unknown token string {s!r}: not a special, a text piece, "
                             f"or one of <tN>, [HuN], [AcQ_C], <reservedN>")
        t, u, q, c, r = m.groups()
        try:
            if t is not None:
                return self.text_id(int(t))
            if u is not None:
                return self.unit_id(int(u))
            if q is not None:
                return self.codebook_id(int(q), int(c))
            return self._id_in("reserved", int(r), "reserved index")
        except VocabError as e:
            raise VocabError(f"token string {s!r} is not in this vocabulary: {e}") from None

    def render(self, ids: Any) -> str:
        """A token stream as readable text, for debugging."""
        return " ".join(self.to_string(int(i)) for i in np.asarray(ids).ravel())

    def _describe(self, token_id: int) -> str:
        if not 0 <= token_id < self.size:
            return f"outside the vocabulary of size {self.size}"
        return f"{self.to_string(token_id)!r} in range {self.range_of(token_id)}"

    def check_ids(self, ids: Any, allowed: Sequence[str], where: str) -> None:
        """Fail loudly, naming `where`, if any id lies outside the allowed ranges."""
        arr = np.asarray(ids)
        ok = np.zeros(arr.shape, dtype=bool)
        for name in allowed:
            r = self.range(name)
            ok |= (arr >= r.start) & (arr < r.stop)
        if not ok.all():
            bad = int(arr.flat[np.argmax(~ok)])
            raise VocabError(f"{where}: id {bad} is {self._describe(bad)}, "
                             f"but only ranges {list(allowed)} are allowed here")

    # --- persistence and comparison -------------------------------------------------

    def to_json(self) -> dict:
        return {"format": _FORMAT, "size": self.size,
                "ranges": [dataclasses.asdict(r) for r in self.ranges],
                "specials": list(self.specials),
                "text_pieces": None if self.text_pieces is None else list(self.text_pieces)}

    @classmethod
    def from_json(cls, d: dict) -> Vocab:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise VocabError(f"not an slm vocabulary: expected format {_FORMAT!r}, got {found!r}")
        try:
            vocab = cls([TokenRange(**r) for r in d["ranges"]], d["specials"], d["text_pieces"])
            size = d["size"]
        except (KeyError, TypeError) as e:
            raise VocabError(f"malformed vocabulary JSON: {e!r}") from None
        if size != vocab.size:
            raise VocabError(f"vocabulary JSON says size {size} but its ranges add up to {vocab.size}")
        return vocab

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=False)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, VocabError) as e:  # ValueError covers bad JSON and bad UTF-8
            raise VocabError(f"cannot load vocabulary from {path}: {e}") from e

    @functools.cached_property
    def _key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def __eq__(self, other: object) -> bool:
        return self._key == other._key if isinstance(other, Vocab) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, ranges=[{', '.join(map(str, self.ranges))}])"

    def check_compatible(self, other: Vocab, where: str) -> None:
        """Refuse to mix vocabularies, e.g. this run's tokenizers with a checkpoint's."""
        if self == other:
            return
        problems = []
        for name in dict.fromkeys([*self._by_name, *other._by_name]):
            here, there = (v._by_name.get(name) for v in (self, other))
            if here != there:
                problems.append(f"range {name!r}: {_span(here)} here vs {_span(there)} in {where}")
        if self.specials != other.specials:
            problems.append(_difference("specials", self.specials, other.specials, where))
        if self.text_pieces != other.text_pieces:
            problems.append(_difference("text pieces", self.text_pieces, other.text_pieces, where))
        raise VocabError(f"vocabulary does not match {where}:\n  " + "\n  ".join(problems) + f"\nFix: {_FIX}.")
