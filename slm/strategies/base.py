"""What every strategy shares: segments in, a `[K, T]` token grid with loss weights out.

A strategy's `layout` turns a list of segments (`slm.types.Segment`) into a `Grid`, and
`unlayout` reads segments back from a grid; the model, trainer and sampler only ever see grids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from slm.config import ModelConfig, StreamConfig
from slm.registry import NoOptions, Registry, check_options_class
from slm.strategies.policy import DecodePolicy
from slm.types import Grid, Segment, StreamSpec, build_streams
from slm.vocab import Vocab


class Strategy(Protocol):
    """A way of laying segments out; see the strategy table in the design notes.

    Loss weights: when the segments hold an assistant turn, only the assistant's tokens (and
    the markers that end them) are weighted; otherwise (pretraining) every token is.
    """

    name: str
    frame_aligned: bool  # needs frame-level units aligned with codec frames (no de-duplication)

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        """The model's input/output streams (ranges each may hold, temporal or depth head)."""

    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """The whole example: what the model trains on."""

    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """Segments back from a grid (a laid-out example, or a prompt plus a sampled reply)."""

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """The grid the sampler prefills: the user turns, up to where the reply starts.

        For every example, `layout(segments)` begins with `prompt(user segments)`.
        """

    def policy(self, vocab: Vocab) -> DecodePolicy:
        """Per-stream phase machines that steer the shared sampler."""


@dataclasses.dataclass(frozen=True)
class StrategyPlugin:
    """What `strategy.name` resolves to: the dataclass `strategy.options` is checked against,
    and the factory building the strategy from those options and the vocabulary. An options
    field named `task` is set per data task, and one named `task_format` from
    `strategy.task_format` (slm.strategies.tasks)."""

    options: type
    factory: Callable[[Any, Vocab], Strategy]


STRATEGIES: Registry[StrategyPlugin] = Registry(
    "strategy", "slm.strategies", "strategy.name", "slm.strategies.register_strategy")


def register_strategy(name: str, factory: Callable[[Any, Vocab], Strategy],
                      options: type = NoOptions) -> None:
    """Make `strategy.name: <name>` usable by configs, the data pipeline and `slm sample`;
    `options` is the dataclass of what `strategy.options` may hold, passed to `factory`."""
    check_options_class(options, f"strategy {name!r}")
    STRATEGIES.register(name, StrategyPlugin(options, factory))


def assistant_turn(strategy: Strategy, prompt: Grid, reply: Grid, vocab: Vocab) -> list[Segment]:
    """The segments a sampled reply adds to its prompt.

    Strategies with role markers read them off the whole grid; a role-free one (interleaved)
    provides `continuation(prompt, reply, vocab)` to say where the reply begins.
    """
    continuation = getattr(strategy, "continuation", None)
    if continuation is not None:
        return continuation(prompt, reply, vocab)
    return [s for s in strategy.unlayout(Grid.concat([prompt, reply]), vocab) if s.role == "assistant"]


def stream_specs(strategy: Strategy, vocab: Vocab) -> tuple[StreamSpec, ...]:
    """The strategy's streams resolved to vocabulary spans (what heads and rules index)."""
    return build_streams(ModelConfig(streams=strategy.streams(vocab)), vocab)


def run(ids: np.ndarray, weight: float) -> Grid:
    """A one-stream grid of `ids`, every step weighted `weight`."""
    ids = np.asarray(ids, np.int32).reshape(1, -1)
    return Grid(ids, np.full(ids.shape, weight, np.float32))
