"""How a strategy steers sampling: one small phase machine per stream, as data.

The sampler is one jitted loop for every strategy, so a strategy cannot hand it Python code.
It hands it tables instead: for each stream, per phase, which ids may be sampled and which
phase each sampled id leads to; which phases are final; how many steps the stream waits after
the reply starts (its delay) and which id it emits while waiting or once finished. A reply is
finished when every stream is in a final phase. Modality markers switching the allowed
vocabulary (ESPnet-SpeechLM, SpiRit-LM's forced modality) and Mini-Omni's delayed, padded
streams are all instances of this.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from slm.types import StreamSpec


@dataclasses.dataclass(frozen=True, eq=False)
class StreamRule:
    allowed: np.ndarray  # bool [P, V_k]: ids (in the stream's local head order) allowed per phase
    next_phase: np.ndarray  # int32 [P, V_k]: phase after sampling each id
    final: np.ndarray  # bool [P]
    start: int  # phase when the reply starts
    delay: int  # steps after the reply starts before the stream samples
    fill: int  # flat id emitted while waiting and once final


@dataclasses.dataclass(frozen=True, eq=False)
class DecodePolicy:
    rules: tuple[StreamRule, ...]  # one per model stream, in stream order


class RuleBuilder:
    """Declare phases by the flat ids they allow and the ids that move between them.

    Ids without a declared transition keep the stream in its phase.
    """

    def __init__(self, stream: StreamSpec):
        self.flat_ids = np.concatenate([np.arange(a, b) for a, b in stream.spans])
        self.local = {int(flat): i for i, flat in enumerate(self.flat_ids)}
        self.phases: dict[str, tuple[np.ndarray, bool]] = {}
        self.moves: list[tuple[str, list[int], str]] = []

    def _local(self, ids: Iterable[int], what: str) -> list[int]:
        missing = [int(i) for i in ids if int(i) not in self.local]
        if missing:
            raise ValueError(f"{what}: ids {missing[:5]} are not in this stream's vocabulary")
        return [self.local[int(i)] for i in ids]

    def phase(self, name: str, allowed: Iterable[int], final: bool = False) -> "RuleBuilder":
        mask = np.zeros(len(self.flat_ids), bool)
        mask[self._local(allowed, f"phase {name!r}")] = True
        self.phases[name] = (mask, final)
        return self

    def on(self, phase: str, ids: Iterable[int], goto: str) -> "RuleBuilder":
        self.moves.append((phase, self._local(ids, f"move {phase!r} -> {goto!r}"), goto))
        return self

    def build(self, start: str, fill: int, delay: int = 0) -> StreamRule:
        names = list(self.phases)
        index = {name: i for i, name in enumerate(names)}
        next_phase = np.repeat(np.arange(len(names), dtype=np.int32)[:, None], len(self.flat_ids), 1)
        for phase, ids, goto in self.moves:
            next_phase[index[phase], ids] = index[goto]
        return StreamRule(
            allowed=np.stack([self.phases[n][0] for n in names]),
            next_phase=next_phase,
            final=np.array([self.phases[n][1] for n in names]),
            start=index[start], delay=delay, fill=fill,
        )
