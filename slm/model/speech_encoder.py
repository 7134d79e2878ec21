"""A speech encoder inside the model: the corpus recognizer's encoder, run on log-mel frames.

Cached features (`tokenizers.features: states`) are the unit encoder's states computed once at
tokenize time: cheap to train on, but the encoder can never change. With
`model.speech_input.encoder: ctc` the shards keep the encoder's *inputs* (normalized log-mels,
`tokenizers.features: log_mel`) and the model runs the encoder in every step, so it can train
(or stay frozen through `train.trainable`) at the cost of running it. Both paths give the
projector the same frames: states at 25 Hz repeated onto the 50 Hz timeline the grid lays out,
so a frozen in-model encoder hears exactly what the cache holds (a test checks).

A grid carries a user turn's frames on consecutive steps; the masked frames of a row that touch
form one utterance (strategies put markers between turns), and the encoder attends within it
only (`recognizer.encode`'s runs). Its stride-2 convolution is centred on even frames, so every
utterance must start on one: an even number of frames per step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slm.config import SpeechInputConfig
from slm.errors import CheckpointError, ConfigError, DataError
from slm.speech.recognizer import FEATURES, RecognizerConfig, encode, init_params

ENCODERS = ("ctc",)  # model.speech_input.encoder values besides "" (features are states)
RECOGNIZER_FILES = ("encoder.json", "encoder.npz")  # what slm.speech.ctc_units saves
CLASSIFIER = ("out.w", "out.b")  # the recognizer's character layer, which encoding never reads


def _names(shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axes: matrices shard their input dimension like the decoder's, the rest stays whole."""
    return {1: ("norm",), 2: ("embed", None), 3: (None, None, None)}[len(shape)]


class RecognizerEncoder(nnx.Module):
    """`[B, T, W, mels]` log-mel frames and their mask -> `[B, T, W, d]` encoder states."""

    def __init__(self, cfg: RecognizerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dim = cfg.d
        self.weights = nnx.Dict({_key(name): nnx.Param(value, out_sharding=_names(value.shape))
                                 for name, value in init_params(cfg, rngs.params()).items()
                                 if name not in CLASSIFIER})

    def __call__(self, frames_btwf: jax.Array, mask_btw: jax.Array) -> jax.Array:
        b, t, w, f = frames_btwf.shape
        if f != FEATURES.dim:
            raise DataError(f"the in-model speech encoder reads {FEATURES.dim} log-mel bins per "
                              f"frame, but the features have {f}: tokenize with "
                              "tokenizers.features=log_mel")
        mask_bf = mask_btw.reshape(b, t * w).astype(bool)
        starts_bf = mask_bf & ~jnp.pad(mask_bf, ((0, 0), (1, 0)))[:, :-1]
        runs_bf = jnp.cumsum(starts_bf, axis=1) * mask_bf
        params = {key.replace("_", "."): value[...] for key, value in self.weights.items()}
        states = encode(params, frames_btwf.reshape(b, t * w, f).astype(jnp.float32), runs_bf,
                        self.cfg)
        return jnp.repeat(states, 2, axis=1)[:, :t * w].reshape(b, t, w, self.dim)


def _key(name: str) -> str:
    """nnx attribute names cannot hold dots; recognizer names hold no underscores."""
    return name.replace(".", "_")


def build_speech_encoder(cfg: SpeechInputConfig, rngs: nnx.Rngs) -> RecognizerEncoder | None:
    if not cfg.encoder:
        return None
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"model.speech_input.encoder={cfg.encoder!r}; choose '' (the features "
                          f"are encoder states already) or one of {', '.join(ENCODERS)}")
    return RecognizerEncoder(recognizer_config(cfg), rngs)


def recognizer_config(cfg: SpeechInputConfig) -> RecognizerConfig:
    """The encoder's shape: `encoder_options` over the recognizer defaults the unit encoder trains with."""
    fields = {f.name for f in dataclasses.fields(RecognizerConfig)}
    unknown = sorted(set(cfg.encoder_options) - fields)
    if unknown:
        raise ConfigError(f"model.speech_input.encoder_options has {unknown}; the ctc encoder "
                          f"takes {sorted(fields)}")
    return RecognizerConfig(**cfg.encoder_options)


def pretrained_encoder(cfg: SpeechInputConfig) -> dict[str, np.ndarray] | None:
    """The saved recognizer's weights under the model's parameter names, checked against the
    model's encoder shape; None when the encoder starts from scratch (`encoder_dir` empty)."""
    if not cfg.encoder or not cfg.encoder_dir:
        return None
    directory = Path(cfg.encoder_dir)
    missing = [name for name in RECOGNIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"model.speech_input.encoder_dir={cfg.encoder_dir!r} lacks "
                              f"{', '.join(missing)}; point it at a trained recognizer (the unit "
                              "encoder's directory inside a tokenizers directory, e.g. "
                              "<tokenizers>/unit_encoder)")
    saved = json.loads((directory / RECOGNIZER_FILES[0]).read_text("utf-8"))["config"]
    wanted = dataclasses.asdict(recognizer_config(cfg))
    differ = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v and k in
              ("d", "layers", "heads", "kernel")}
    if differ:
        raise CheckpointError(f"{directory}: the recognizer has {', '.join(f'{k}={s}' for k, (s, _) in differ.items())}"
                              f", but model.speech_input.encoder_options give "
                              f"{', '.join(f'{k}={w}' for k, (_, w) in differ.items())}; make them agree")
    with np.load(directory / RECOGNIZER_FILES[1], allow_pickle=False) as arrays:
        return {_key(name): np.asarray(value, np.float32) for name, value in arrays.items()
                if name not in CLASSIFIER}
