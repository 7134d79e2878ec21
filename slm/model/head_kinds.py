"""Head kinds beyond the built-in `temporal` and `depth`: plug-ins on the final hidden states.

A stream whose config says `head: <kind>` is owned by the head kind registered under that
name. The model builds one instance of each kind over all the streams it owns and, in
training, hands it the temporal decoder's final states `[B, T, D]` with those streams' rows of
the grid; the kind returns its own loss per stream (or one for all of them), which sums into
the training loss like any head's. Its streams are embedded as inputs unless the kind says
`inputs = False`: a head that speaks from the states (LLaMA-Omni's CTC unit decoder) must not
let the model read targets it never produced while decoding.

A kind is one module with an `Options` dataclass and one `register_head_kind` call (or a
Python entry point, see the README); `model.head_options: {<kind>: {...}}` configures it.
In the sampler a kind's streams emit their policy's fill, unless it is a `SpeakingHead`: then
the sampler hands it each reply state as it is made and writes the ids it decodes into its
streams (slm.model.unit_decoder, used by the text_driven strategy).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import jax
from flax import nnx

from slm.errors import ConfigError
from slm.registry import Registry, check_options_class, parse_options
from slm.types import StreamSpec

BUILT_IN = ("temporal", "depth")

# per stream name: (loss sum, weight sum, targets not scored: outside the stream's vocabulary,
# or past what a head scores in one row, as the CTC unit decoder's `max_states`)
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
    inputs: ClassVar[bool] = True  # whether the model also embeds its streams as inputs

    def __init__(self, streams: tuple[StreamSpec, ...], d_model: int, options: Any,
                 rngs: nnx.Rngs):
        self.streams, self.options = streams, options


@runtime_checkable
class SpeakingHead(Protocol):
    """A head kind that decodes while the sampler runs ("a head owns its decode rule").

    All three run on device inside the sampler's jitted loop, with fixed shapes. The sampler
    calls `decode_step` once per reply step with the state made by the step before, and
    `speak_b` true for rows whose step before wrote text (so a reply's text states are
    spoken, as in training); after each stretch of steps it writes `decoded` into the
    kind's streams, so a streaming caller sees the ids made so far.
    """

    def decode_init(self, batch: int, steps: int) -> Any:
        """The carry for replies of up to `steps` steps (any pytree)."""

    def decode_step(self, carry: Any, h_bd: jax.Array, speak_b: jax.Array) -> tuple[Any, jax.Array]:
        """(next carry, bool `[B]`: the row has emitted audio so far) after one state."""

    def decoded(self, carry: Any, steps: int) -> jax.Array:
        """The kind's streams' flat ids so far, `[B, K_kind, steps]`; -1 where it has none
        (the sampler writes the policy's fill there)."""


HEAD_KINDS: Registry[type[HeadKind]] = Registry(
    "head kind", "slm.heads", "model.streams[].head", "slm.model.head_kinds.register_head_kind")


def register_head_kind(name: str, cls: type[HeadKind]) -> None:
    """Make `head: <name>` usable in stream configs."""
    if name in BUILT_IN:
        raise ConfigError(f"head kind {name!r} is built in; register another name")
    check_options_class(getattr(cls, "Options", None), f"head kind {name!r} ({cls.__name__})")
    HEAD_KINDS.register(name, cls)


def input_streams(streams: tuple[StreamSpec, ...]) -> tuple[int, ...]:
    """Indices of the streams the model embeds: all but those of kinds with `inputs = False`
    (an unknown kind counts as an input here; `build_head_kinds` names it)."""
    def embedded(head: str) -> bool:
        kind = None if head in BUILT_IN else HEAD_KINDS.get(head)
        return kind is None or kind.inputs
    return tuple(k for k, stream in enumerate(streams) if embedded(stream.head))


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
