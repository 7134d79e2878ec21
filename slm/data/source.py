"""The token-source protocol the trainer reads, and the registry of sources by config name."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

from slm.config import Config
from slm.errors import ConfigError, DataError
from slm.vocab import Vocab


class TokenSource(Protocol):
    """Yields this host's rows of each global batch: {"tokens": int32, "weights": float32},
    both `[B_host, K, T]`; a source that packs several examples into a row adds "segments":
    int32 `[B_host, 1, T]`, the example each position belongs to (1, 2, ... along the row;
    0 for padding). Its state is JSON-able and saved with every checkpoint (as grain's
    iterators), so a resumed run reads exactly the batches the uninterrupted one would have."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def make_source(config: Config, vocab: Vocab, process_index: int = 0,
                process_count: int = 1) -> TokenSource:
    """The source named by `data.source`, reading this host's share of every batch."""
    from slm.data.synthetic import SyntheticTokens

    sources = {"synthetic": SyntheticTokens, "records": records_source}
    if config.data.source not in sources:
        raise ConfigError(
            f"data.source={config.data.source!r} is unknown; choose one of {sorted(sources)}"
        )
    if config.data.batch_size % process_count:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} must divide evenly over {process_count} hosts"
        )
    return sources[config.data.source](config, vocab, process_index, process_count)


def with_speech_input(config: Config) -> Config:
    """`config` whose `model.speech_input.dim` is the width of the frames `slm tokenize` cached
    in `data.dir`, when the strategy hears the user as features (a set dim must match it)."""
    from slm.data.examples import split_for
    from slm.data.records import read_index

    if config.strategy.user_input != "features":
        return config
    if config.data.source != "records" or not config.data.dir:
        raise ConfigError("strategy.user_input=features reads the speech frames cached in "
                          "tokenized shards: set data.source=records and data.dir")
    heard = [n for n, w in config.data.mixture.items() if w > 0 and n in ("dialogue", "asr")]
    split = split_for(heard[0] if heard else "dialogue", config.data.split)
    meta = read_index(config.data.dir, split)
    cached = meta.get("feature_dim", 0)
    if not cached:
        raise DataError(f"{config.data.dir}/{split}.json: the shards hold no speech frames; "
                        "re-run `slm tokenize` with tokenizers.cache_features=true (--features)")
    kind = meta.get("features", "states")
    wanted = "log_mel" if config.model.speech_input.encoder else "states"
    if kind != wanted:
        raise DataError(f"{config.data.dir}/{split}.json: the shards hold {kind} frames, but "
                        f"model.speech_input.encoder={config.model.speech_input.encoder!r} hears "
                        f"{wanted}: tokenize with tokenizers.features={wanted} (--features "
                        f"{wanted}), or " + ("set model.speech_input.encoder=ctc"
                                             if kind == "log_mel" else
                                             "leave model.speech_input.encoder empty"))
    want = config.model.speech_input.dim
    if want and want != cached:
        raise DataError(f"model.speech_input.dim={want}, but the frames cached in "
                        f"{config.data.dir}/{split}.json are {cached} wide: set dim to {cached} "
                        "(or 0 to take it from the data), or tokenize with the model's encoder")
    speech_input = dataclasses.replace(config.model.speech_input, dim=cached)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, speech_input=speech_input))


def records_source(config: Config, vocab: Vocab, process_index: int, process_count: int):
    """Tokenized shards laid out by the configured strategy, mixed by task weight."""
    from slm.data.examples import split_for, task
    from slm.data.pipeline import GrainTokenSource
    from slm.data.tokenizers import instruction_tokenizer
    from slm.model.speech_input import hearing_for
    from slm.strategies import make_strategy

    data, parts, text = config.data, [], instruction_tokenizer(config)
    if not data.dir:
        raise ConfigError("data.source=records needs data.dir (the output of `slm tokenize`)")
    for name, weight in data.mixture.items():
        _, segments_of = task(name)
        if weight <= 0:  # weight 0 switches a task off, e.g. in one run of an ablation
            continue
        strategy = make_strategy(config.strategy, vocab, data_task=name, text=text)
        hearing = hearing_for(config, strategy)

        def layout(record, rng, segments_of=segments_of, strategy=strategy, hearing=hearing):
            segments = segments_of(record, vocab, rng, hearing)
            return hearing.attach(strategy.layout(segments, vocab), segments, vocab).as_batch()

        parts.append((split_for(name, data.split), layout, weight))
    return GrainTokenSource(data.dir, parts, seed=config.seed, seq_len=data.seq_len,
                            batch_size=data.batch_size // process_count,
                            features=config.strategy.user_input == "features",
                            process_index=process_index, process_count=process_count)
