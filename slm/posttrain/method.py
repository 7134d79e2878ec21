"""Post-training methods by name (`slm posttrain <method>`), and what a method is built from.

A method is one module: a class with `batch` (rollouts, or any data, for one step) and
`objective` (its loss, minimised by `slm train`'s own step), registered with
`register_method`. The built-ins (`kd`, `dpo`, `grpo`) register themselves when
`slm.posttrain` is imported; another package registers through a Python entry point in the
group `slm.posttrain_methods` (see `slm.registry`), and `slm posttrain` lists every
registered name as a subcommand.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax

from slm.config import Config
from slm.errors import ConfigError
from slm.model.speech_input import hearing_for
from slm.data.tokenizers import instruction_tokenizer
from slm.posttrain.prompts import Prompts, text_tokenizer
from slm.posttrain.rewards import Scorer
from slm.posttrain.rollout import Rollout
from slm.registry import Registry
from slm.strategies import make_strategy
from slm.strategies.base import Strategy
from slm.text.tokenizer import TextTokenizer
from slm.train.checkpoint import restore_params
from slm.train.state import StatePlan
from slm.types import StreamSpec
from slm.vocab import Vocab

RESERVED = ("compare",)  # `slm posttrain compare` runs the registered methods side by side


class Method(Protocol):
    replies_per_step: int  # reply grids a step scores (the progress bar's tokens)

    def batch(self, params, step: int, key: jax.Array) -> tuple[dict, dict]:
        """(device batch for `objective`, host scalars to report) of step `step` (1-based),
        drawn with `params`, the current weights."""

    def objective(self, model, batch: dict, key: jax.Array | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, dict]]:
        """(loss sum, (weight, metrics)) as `slm.train.step` minimises it."""


class MethodSetup:
    """What a method is built from: the run's config, vocabulary, state plan and mesh, and,
    made on first use so a method pays only for what it asks for, its strategy, rollout
    sampler, frozen reference (the parameters of `checkpoint.init_from`), questions and
    reward."""

    def __init__(self, config: Config, vocab: Vocab, plan: StatePlan, mesh):
        self.config, self.vocab, self.plan, self.mesh = config, vocab, plan, mesh

    @functools.cached_property
    def strategy(self) -> Strategy:
        return make_strategy(self.config.strategy, self.vocab,
                             text=instruction_tokenizer(self.config))

    @functools.cached_property
    def rollout(self) -> Rollout:
        # the sampler needs the model's structure alone: every rollout hands it the weights
        return Rollout(self.plan.model(self.plan.param_shapes), self.strategy.policy(self.vocab),
                       self.vocab, self.config.posttrain.rollout)

    @property
    def streams(self) -> tuple[StreamSpec, ...]:
        return self.rollout.sampler.streams

    @functools.cached_property
    def reference(self) -> dict:
        return restore_params(self.config.checkpoint.init_from, self.plan, self.vocab)

    @functools.cached_property
    def text(self) -> TextTokenizer:
        return text_tokenizer(self.config)

    @functools.cached_property
    def prompts(self) -> Prompts:
        return Prompts(self.config, self.vocab, self.strategy,
                       hearing_for(self.config, self.strategy), self.text)

    @functools.cached_property
    def scorer(self) -> Scorer:
        return Scorer(self.config.posttrain.reward, self.strategy, self.vocab, self.text)


def one_update(config: Config) -> int:
    return 1


@dataclasses.dataclass(frozen=True)
class MethodPlugin:
    """What `slm posttrain <name>` resolves to."""

    build: Callable[[MethodSetup], Any]  # -> a `Method`
    summary: str  # one line for `slm posttrain --help`
    # optimizer updates per step (GRPO's iterations over one batch of rollouts); checkpoints
    # and the learning-rate schedule count updates, as `slm train` counts steps
    updates: Callable[[Config], int] = one_update


METHODS: Registry[MethodPlugin] = Registry(
    "post-training method", "slm.posttrain_methods", "slm posttrain <method>",
    "slm.posttrain.register_method")


def register_method(name: str, build: Callable[[MethodSetup], Any], summary: str,
                    updates: Callable[[Config], int] = one_update) -> None:
    """Make `slm posttrain <name>` run the method `build(setup)` makes."""
    if name in RESERVED:
        raise ConfigError(f"post-training method {name!r}: the name is taken by "
                          f"`slm posttrain {name}`; register another")
    METHODS.register(name, MethodPlugin(build, summary, updates))
