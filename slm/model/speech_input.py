"""The model's speech input: a projector from encoder frames to d_model, one output per step.

A grid that hears the user as features carries `frames_per_step` frames beside each step
(slm.strategies.hearing). The projector reads a row's frames laid end to end, so a conv
projector's kernel sees the neighbouring steps of the same utterance, and emits exactly one
output per step: its window must hold a whole number of steps' frames per output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slm.config import Config, SpeechInputConfig
from slm.errors import ConfigError, DataError
from slm.model.projectors import Projector, build_projector
from slm.model.speech_encoder import recognizer_config
from slm.strategies.base import Strategy
from slm.strategies.hearing import Hearing


def build_speech_input(cfg: SpeechInputConfig, d_model: int, rngs: nnx.Rngs) -> Projector:
    projector = build_projector(cfg.projector, projected_dim(cfg), d_model, cfg.projector_options,
                                rngs)
    _check_window(projector, cfg)
    return projector


def projected_dim(cfg: SpeechInputConfig) -> int:
    """The width of what the projector reads: the in-model encoder's states, else the frames."""
    return recognizer_config(cfg).d if cfg.encoder else cfg.dim


def frames_per_step(cfg: SpeechInputConfig) -> int:
    """Encoder frames behind one grid step, from the projector's window (built abstractly:
    no parameters are made)."""
    if cfg.dim < 1:
        raise ConfigError("model.speech_input.dim must be the width of the user's speech frames "
                          "(set by training from the tokenized data's cached features)")
    projector = nnx.eval_shape(lambda: build_projector(cfg.projector, projected_dim(cfg), 8,
                                                       cfg.projector_options, nnx.Rngs(0)))
    return _check_window(projector, cfg)


def _check_window(projector: Projector, cfg: SpeechInputConfig) -> int:
    if projector.window % projector.per_window:
        raise ConfigError(f"model.speech_input: projector {cfg.projector!r} emits "
                          f"{projector.per_window} outputs per {projector.window}-frame window; a "
                          "grid step needs a whole number of frames, so choose options where the "
                          "window is a multiple of the outputs per window")
    per_step = projector.window // projector.per_window
    if cfg.encoder and per_step % 2:
        raise ConfigError(f"model.speech_input: {per_step} frames per grid step, but the in-model "
                          f"encoder {cfg.encoder!r} halves the frame rate from an utterance's "
                          "first frame, so each must start on an even frame: choose projector "
                          "options with an even number of frames per step")
    return per_step


def project_steps(projector: Projector, features_btwd: jax.Array, mask_btw: jax.Array,
                  dtype: jnp.dtype) -> jax.Array:
    """`[B, T, W, D]` frames and their mask -> `[B, T, d_model]`, zero at steps without frames."""
    b, t, w, d = features_btwd.shape
    if d != projector.enc_dim:
        raise DataError(f"speech features of width {d}, but the model's projector reads "
                        f"{projector.enc_dim} (model.speech_input.dim): tokenize with the unit "
                        "tokenizer the model was trained with")
    if w * projector.per_window != projector.window:
        raise DataError(f"{w} frames per grid step, but the projector turns {projector.window} "
                        f"frames into {projector.per_window} outputs: lay out the features with "
                        "frames_per_step from the model's config")
    y_btd, _ = projector(features_btwd.reshape(b, t * w, d).astype(dtype), mask_btw.reshape(b, t * w))
    return y_btd.astype(dtype)


def hearing_for(config: Config, strategy: Strategy) -> Hearing:
    """How `config`'s model hears the user: the strategy's user input, units de-duplicated
    unless the strategy is frame aligned, or features grouped by the projector's window."""
    user_input = config.strategy.user_input
    if user_input == "features":
        speech_input = config.model.speech_input
        return Hearing("features", frames_per_step=frames_per_step(speech_input),
                       feature_dim=speech_input.dim,
                       frames="log_mel" if speech_input.encoder else "states")
    return Hearing(user_input, dedup=config.strategy.dedup_input_units and not strategy.frame_aligned)
