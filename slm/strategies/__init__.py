"""Generation strategies: how segments become a `[K, T]` token grid and back.

`make_strategy` is the only place that knows the strategies by name; the model, trainer and
sampler only see grids, stream configs and decode policies.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from slm.config import Config, StrategyConfig
from slm.errors import ConfigError
from slm.strategies.base import Strategy, stream_specs
from slm.strategies.chain_of_modality import ChainOfModality
from slm.strategies.coarse_to_fine import CoarseToFine
from slm.strategies.interleaved import Interleaved
from slm.strategies.parallel import Parallel
from slm.strategies.tasks import reply_task
from slm.vocab import Vocab

# name -> factory(strategy config, vocab); `register_strategy` adds one without touching slm
FACTORIES: dict[str, Callable[[StrategyConfig, Vocab], Strategy]] = {
    "interleaved": lambda cfg, vocab: Interleaved(force=cfg.force_modality or None),
    "chain_of_modality": lambda cfg, vocab: ChainOfModality(task=cfg.task),
    "parallel": lambda cfg, vocab: Parallel(
        speech=cfg.speech, delays=cfg.delays or None,
        num_codebooks=vocab.num_codebooks if cfg.speech == "codes" else None),
    "coarse_to_fine": lambda cfg, vocab: CoarseToFine(vocab.num_codebooks,
                                                      acoustic_delay=cfg.acoustic_delay,
                                                      user_codes=cfg.user_codes),
}
NAMES = tuple(FACTORIES)  # the four built-in strategies


def register_strategy(name: str, factory: Callable[[StrategyConfig, Vocab], Strategy]) -> None:
    """Make `strategy.name: <name>` usable by configs, the data pipeline and `slm sample`."""
    FACTORIES[name] = factory


def make_strategy(cfg: StrategyConfig, vocab: Vocab, data_task: str = "") -> Strategy:
    """`data_task`: the data task (slm.data.examples) of the examples it will lay out, so a
    strategy with task tags tags an ASR pair as transcription (see slm.strategies.tasks)."""
    if cfg.name not in FACTORIES:
        raise ConfigError(f"strategy.name={cfg.name!r}; choose one of {', '.join(FACTORIES)}")
    if data_task:
        cfg = dataclasses.replace(cfg, task=reply_task(data_task, cfg.task))
    return FACTORIES[cfg.name](cfg, vocab)


def with_strategy_streams(config: Config, vocab: Vocab) -> Config:
    """A copy of `config` whose model streams (and depth conditioning) are the strategy's.

    Without a strategy the config's own `model.streams` stand (raw token sources).
    """
    if not config.strategy.name:
        return config
    strategy = make_strategy(config.strategy, vocab)
    streams = strategy.streams(vocab)
    depth = config.model.depth
    if any(s.head == "depth" for s in streams):
        if depth.num_layers < 1:
            raise ConfigError(f"strategy {strategy.name} predicts codebooks with a depth decoder: "
                              "set model.depth.num_layers >= 1")
        depth = dataclasses.replace(depth, cond_stream=strategy.depth_cond_stream)
    model = dataclasses.replace(config.model, streams=streams, depth=depth)
    return dataclasses.replace(config, model=model)


__all__ = ["NAMES", "Strategy", "make_strategy", "register_strategy", "stream_specs",
           "with_strategy_streams"]
