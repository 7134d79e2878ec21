"""What trains (`train.trainable`): a split of the parameters' pure dict into trained and frozen.

The train step differentiates only the trained part, so no gradient is computed for a frozen
parameter (XLA drops every product that would only feed one), and the optimizer is built over
the trained part alone, so frozen parameters carry no optimizer state. With `[all]` the trained
part is the whole dict, so train states and checkpoints keep the layout they always had.

An entry is a part or a regex over parameter paths (`decoder/layers/attn/wq`; layers are
stacked, so a path names a weight of every layer). Parts other than `all` and `lora` select
base weights only: `[decoder, lora]` trains the decoder and every adapter.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax

from slm.errors import ConfigError

ParamPath = tuple[str, ...]


def is_adapter(path: ParamPath) -> bool:
    return "lora" in path


def is_base(path: ParamPath) -> bool:
    return not is_adapter(path)


def _base(select: Callable[[ParamPath], bool]) -> Callable[[ParamPath], bool]:
    return lambda path: select(path) and is_base(path)


PARTS: dict[str, Callable[[ParamPath], bool]] = {
    "all": lambda path: True,
    "lora": is_adapter,
    "projector": _base(lambda path: path[0] == "speech_input"),
    "encoder": _base(lambda path: path[0] == "speech_encoder"),
    "heads": _base(lambda path: path[0] in ("heads", "head_kinds") or path[:2] == ("depth", "head")),
    "embeddings": _base(lambda path: path[0] == "embed"),
    "decoder": _base(lambda path: path[0] == "decoder"),
    "depth": _base(lambda path: path[0] == "depth"),
    "norms": _base(lambda path: any(p.endswith("norm") for p in path)),
}
HINTS = {"lora": "add adapters with model.lora.rank > 0",
         "projector": "give the model a speech input (strategy.user_input=features)",
         "encoder": "run the speech encoder in the model (model.speech_input.encoder=ctc)"}


def paths(tree) -> list[ParamPath]:
    return [tuple(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def split_tree(tree: dict, keep: Callable[[ParamPath], bool],
               prefix: ParamPath = ()) -> tuple[dict, dict]:
    """(leaves whose path `keep` accepts, the others), each a nested dict without empty branches."""
    kept, rest = {}, {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            a, b = split_tree(value, keep, path)
            if a:
                kept[key] = a
            if b:
                rest[key] = b
        elif keep(path):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def merge_trees(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of `split_tree`)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_trees(out[key], value) if key in out else value
    return out


@dataclasses.dataclass(frozen=True)
class Trainable:
    """The selected parameter paths; `everything` keeps the whole tree as the trained part."""

    chosen: frozenset[ParamPath]
    everything: bool

    def split(self, params: Any) -> tuple[dict, dict]:
        """(trained, frozen) parts of `params` (or of any tree shaped like them)."""
        if self.everything:
            return params, {}
        return split_tree(params, self.chosen.__contains__)

    def merge(self, trained: dict, frozen: dict) -> dict:
        return trained if self.everything else merge_trees(trained, frozen)


def _matcher(entry: str, i: int) -> Callable[[ParamPath], bool]:
    """A part's selector, or a regex matched against whole `/`-joined parameter paths."""
    if entry in PARTS:
        return PARTS[entry]
    try:
        pattern = re.compile(entry)
    except re.error as err:
        raise ConfigError(f"train.trainable[{i}]={entry!r} is neither a part ({', '.join(PARTS)})"
                          f" nor a valid regex: {err}") from None
    return lambda path: pattern.fullmatch("/".join(path)) is not None


def select(entries: list[str], params: dict) -> Trainable:
    """The parameters `entries` (train.trainable) name; an entry that names none is an error."""
    if not entries:
        raise ConfigError("train.trainable is empty; name what trains, e.g. [all] or "
                          f"[projector, lora] (parts: {', '.join(PARTS)})")
    every = paths(params)
    chosen: set[ParamPath] = set()
    for i, entry in enumerate(entries):
        match = _matcher(entry, i)
        hit = {path for path in every if match(path)}
        if not hit:
            fix = HINTS.get(entry) or (
                f"name a part ({', '.join(PARTS)}) or a regex matching whole parameter paths, "
                f"such as {', '.join('/'.join(p) for p in every[:3])}")
            raise ConfigError(f"train.trainable[{i}]={entry!r} selects no parameter of this "
                              f"model; {fix}")
        chosen |= hit
    return Trainable(frozenset(chosen), everything=len(chosen) == len(every))
