"""Generation strategies: how segments become a `[K, T]` token grid and back.

Each strategy module registers its strategy by name with its options dataclass
(`register_strategy`); `make_strategy` builds the one a config names. The model, trainer and
sampler only see grids, stream configs and decode policies.
"""

from __future__ import annotations

import dataclasses

# Importing the built-in strategies' modules registers them, in the order NAMES lists them.
from slm.strategies import interleaved, chain_of_modality, parallel, coarse_to_fine, text_driven  # noqa: F401, I001
from slm.config import Config, StrategyConfig, TaskFormatConfig
from slm.errors import ConfigError
from slm.registry import parse_options
from slm.strategies.base import STRATEGIES, Strategy, register_strategy, stream_specs
from slm.strategies.tasks import reply_task, task_format
from slm.text.tokenizer import TextTokenizer
from slm.vocab import Vocab

NAMES = tuple(STRATEGIES)  # the five built-in strategies


def make_strategy(cfg: StrategyConfig, vocab: Vocab, data_task: str = "",
                  text: TextTokenizer | None = None) -> Strategy:
    """The strategy `cfg.name` names, built from `cfg.options` checked against its options
    dataclass. `data_task`: the data task (slm.data.examples) of the examples it will lay out,
    so a strategy whose options have a `task` tags an ASR pair as transcription; one whose
    options have a `task_format` gets `cfg.task_format`, its instructions written with `text`
    (see slm.strategies.tasks)."""
    plugin = STRATEGIES[cfg.name]
    if "task_format" in cfg.options:
        raise ConfigError("strategy.options.task_format: the task format is set for every "
                          "strategy in strategy.task_format")
    options = parse_options(plugin.options, cfg.options, "strategy.options",
                            f"strategy {cfg.name!r}")
    fields = {f.name for f in dataclasses.fields(options)}
    if data_task and "task" in fields:
        options = dataclasses.replace(options, task=reply_task(data_task, options.task))
    if "task_format" in fields:
        options = dataclasses.replace(options, task_format=task_format(cfg.task_format, vocab, text))
    elif cfg.task_format != TaskFormatConfig():
        raise ConfigError(f"strategy.task_format is set, but strategy {cfg.name!r} does not tag "
                          "tasks: use a strategy whose options take a task_format "
                          "(chain_of_modality, text_driven), or leave strategy.task_format out")
    try:
        return plugin.factory(options, vocab)
    except ConfigError as err:  # a value the strategy refuses: say which option holds it
        raise ConfigError(f"strategy {cfg.name!r} with strategy.options {options}: {err}") from None


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


__all__ = ["NAMES", "STRATEGIES", "Strategy", "make_strategy", "register_strategy",
           "stream_specs", "with_strategy_streams"]
