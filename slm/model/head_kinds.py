"""Head kinds beyond the built-in `temporal` and `depth`: plug-ins on the final hidden states.

A stream whose config says `head: <kind>` is owned by the head kind registered under that
name. The model builds one instance of each kind over all the streams it owns and, in
training, hands it the temporal decoder's final states `[B, T, D]` with those streams' rows of
the grid; the kind returns its own loss per stream, which sums into the training loss like
any head's. Its streams are still embedded as inputs (a strategy that must not feed a head's
targets back to the model leaves them "no input", -1, or lays them where they are known).

A kind is one module with an `Options` dataclass and one `register_head_kind` call (or a
Python entry point, see the README); `model.head_options: {<kind>: {...}}` configures it.
In the sampler its streams emit their policy's fill: speaking from hidden states while
decoding (LLaMA-Omni's CTC unit decoder) is the text-driven strategy's part.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
from flax import nnx

from slm.errors import ConfigError
from slm.registry import Registry, check_options_class, parse_options
from slm.types import StreamSpec

BUILT_IN = ("temporal", "depth")

# per stream name: (loss sum, weight sum, targets outside the stream's vocabulary)
StreamLosses = dict[str, tuple[jax.Array, jax.Array, jax.Array]]


class HeadKind(nnx.Module):
    """Base class: subclasses set `Options` and implement `loss`."""

    Options: ClassVar[type]  # a frozen dataclass of the kind's options
    # `loss(h_btd, targets_bkt, weights_bkt, segments_bt) -> StreamLosses`: the summed losses
    # of the kind's streams. `h_btd`: final states `[B, T-1, D]`, position t predicting step
    # t+1; `targets_bkt`, `weights_bkt`: its streams' rows of steps 1..T-1 (weights already
    # zero across packed examples' borders); `segments_bt`: the example of each position in
    # packed rows (None: one example per row).
    loss: ClassVar[Callable[..., StreamLosses]]

    def __init__(self, streams: tuple[StreamSpec, ...], d_model: int, options: Any,
                 rngs: nnx.Rngs):
        self.streams, self.options = streams, options


HEAD_KINDS: Registry[type[HeadKind]] = Registry(
    "head kind", "slm.heads", "model.streams[].head", "slm.model.head_kinds.register_head_kind")


def register_head_kind(name: str, cls: type[HeadKind]) -> None:
    """Make `head: <name>` usable in stream configs."""
    if name in BUILT_IN:
        raise ConfigError(f"head kind {name!r} is built in; register another name")
    check_options_class(getattr(cls, "Options", None), f"head kind {name!r} ({cls.__name__})")
    HEAD_KINDS.register(name, cls)


def build_head_kinds(streams: tuple[StreamSpec, ...], d_model: int, options: dict,
                     rngs: nnx.Rngs) -> tuple[dict[str, tuple[int, ...]], nnx.Dict]:
    """(stream indices per plug-in kind, the built heads) for `streams`' non-built-in heads."""
    index: dict[str, tuple[int, ...]] = {}
    for k, stream in enumerate(streams):
        if stream.head in BUILT_IN:
            continue
        if HEAD_KINDS.get(stream.head) is None:
            known = ", ".join([*BUILT_IN, *HEAD_KINDS.names()])
            raise ConfigError(f"stream {stream.name!r}: head {stream.head!r} is not a head kind; "
                              f"choose one of {known} (or register one: register_head_kind, or a Python entry point in group 'slm.heads')")
        index[stream.head] = (*index.get(stream.head, ()), k)
    unused = sorted(set(options) - set(index))
    if unused:
        raise ConfigError(f"model.head_options has options for {unused}, but no stream has "
                          "that head; remove them or give a stream that head")
    heads = {kind: HEAD_KINDS[kind](tuple(streams[k] for k in ks), d_model,
                                    parse_options(HEAD_KINDS[kind].Options, options.get(kind, {}),
                                                  f"model.head_options.{kind}", f"head kind {kind!r}"),
                                    rngs)
             for kind, ks in index.items()}
    return index, nnx.Dict(heads)
