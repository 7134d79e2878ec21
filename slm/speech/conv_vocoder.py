"""A unit vocoder that hears context: unit ids -> a small 1-D conv net -> log-mel -> Griffin-Lim.

The mean-frame vocoder (`slm.speech.unit_vocoder`) renders each unit alone. That suits units
that describe sound (MFCC k-means), not units that describe *what was said*: supervised CTC
units (`slm.speech.ctc_units`) spend most frames in a few "between characters" states whose
mean frame is a blur of every sound, and the judge heard "cold" as "cow" and "green" as "meow".
What a frame sounds like depends on its neighbours (which character came before, how far into
it we are), so here a stack of dilated convolutions over unit embeddings (about +-15 frames,
0.3 s of context) predicts each log-mel frame, trained with an L1 loss on one voice's frames
(the assistant's: a unit vocoder speaks in the voice it was trained on, as unit HiFi-GANs do).
The wave comes from the same Griffin-Lim as the codec's, so the two differ only in the mel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slm import atomic
from slm.errors import AudioError, CheckpointError, DataError
from slm.speech.codec import RVQConfig, codec_frames, mel_to_waves
from slm.speech.units import PhoneticTokenizer

CONFIG_FILE = "unit_vocoder.json"
PARAMS_FILE = "conv_vocoder.npz"
FORMAT_VERSION = 1
KIND = "unit_conv_mel"
CROP, PAD = 64, 32  # training crops and inference padding, in frames


@dataclass(frozen=True)
class ConvVocoderConfig:
    d: int = 128
    dilations: tuple[int, ...] = (1, 2, 4, 1)  # kernel 5: +-(2 * sum) frames of context
    steps: int = 800
    batch: int = 32
    lr: float = 2e-3


def init_params(num_units: int, n_mels: int, cfg: ConvVocoderConfig, seed: int) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(cfg.dilations) + 2)
    params = {"embed": jax.random.normal(keys[0], (num_units, cfg.d)) * 0.1,
              "out.w": jax.random.normal(keys[1], (cfg.d, n_mels)) / math.sqrt(cfg.d),
              "out.b": jnp.zeros(n_mels)}
    for i, key in enumerate(keys[2:]):
        params[f"conv{i}.w"] = jax.random.normal(key, (5, cfg.d, cfg.d)) / math.sqrt(5 * cfg.d)
        params[f"conv{i}.b"] = jnp.zeros(cfg.d)
        params[f"conv{i}.ln"] = jnp.ones(cfg.d)
    return params


def forward(params: dict, units_bt: jnp.ndarray, cfg: ConvVocoderConfig) -> jnp.ndarray:
    """`[B, T, n_mels]` log-mel frames from `[B, T]` unit ids; residual dilated conv blocks."""
    h = params["embed"][units_bt]
    for i, dilation in enumerate(cfg.dilations):
        x = h - h.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * params[f"conv{i}.ln"]
        x = jax.lax.conv_general_dilated(x, params[f"conv{i}.w"], (1,), "SAME",
                                         rhs_dilation=(dilation,),
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        h = h + jax.nn.gelu(x + params[f"conv{i}.b"])
    return h @ params["out.w"] + params["out.b"]


class ConvUnitVocoder:
    """Frame-level unit ids at the mel frame rate -> wave (the `UnitVocoder` interface)."""

    def __init__(self, params: dict, cfg: ConvVocoderConfig, codec_cfg: RVQConfig, num_units: int):
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.cfg, self.codec_cfg, self._num_units = cfg, codec_cfg, num_units
        self._mels = jax.jit(partial(forward, cfg=cfg))

    @property
    def sample_rate(self) -> int:
        return self.codec_cfg.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.codec_cfg.frame_rate

    @property
    def num_units(self) -> int:
        return self._num_units

    def mel_frames(self, units: np.ndarray) -> np.ndarray:
        units = np.asarray(units, np.int32)
        if units.ndim != 1 or (units.size and (units.min() < 0 or units.max() >= self.num_units)):
            raise DataError(f"the unit vocoder takes 1-D unit ids in 0..{self.num_units - 1}, "
                            f"got shape {units.shape}")
        padded = np.zeros(PAD * math.ceil(max(units.size, 1) / PAD), np.int32)
        padded[:units.size] = units
        return np.asarray(self._mels(self.params, padded[None]))[0, :units.size]

    def decode(self, units: np.ndarray) -> np.ndarray:
        return self.decode_batch([units])[0]

    def decode_batch(self, units: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The wave of each unit sequence, their Griffin-Lim run as one batch."""
        return mel_to_waves([self.mel_frames(u) for u in units], self.codec_cfg)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        atomic.write_npz(directory / PARAMS_FILE, **{k: np.asarray(v) for k, v in self.params.items()})
        atomic.write_json(directory / CONFIG_FILE, {
            "format": FORMAT_VERSION, "kind": KIND, "codec_config": asdict(self.codec_cfg),
            "vocoder_config": asdict(self.cfg), "num_units": self.num_units})

    @classmethod
    def load(cls, directory: str | Path) -> ConvUnitVocoder:
        config, arrays = atomic.read_artifact(Path(directory), CONFIG_FILE, PARAMS_FILE, KIND,
                                              FORMAT_VERSION, "unit vocoder")
        try:
            cfg = ConvVocoderConfig(**{**config["vocoder_config"],
                                       "dilations": tuple(config["vocoder_config"]["dilations"])})
            return cls(arrays, cfg, RVQConfig(**config["codec_config"]), config["num_units"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{directory}/{CONFIG_FILE}: bad unit vocoder config ({err})") from err


def train_conv_vocoder(tokenizer: PhoneticTokenizer, waves: Sequence[tuple[np.ndarray, int]],
                       codec_cfg: RVQConfig = RVQConfig(), cfg: ConvVocoderConfig = ConvVocoderConfig(),
                       seed: int = 0) -> ConvUnitVocoder:
    """Fit the conv net on `(wave, sample_rate)` clips: random CROP-frame windows, L1 on log-mel."""
    if tokenizer.frame_rate != codec_cfg.frame_rate:
        raise DataError(f"the conv unit vocoder needs units at the mel frame rate "
                        f"({codec_cfg.frame_rate} Hz), got {tokenizer.frame_rate} Hz")
    units, mels = [], []
    for i, (wave, rate) in enumerate(waves):
        try:
            u, m = tokenizer.centroids.assign(tokenizer.frames(wave, rate)), codec_frames(wave, rate, codec_cfg)
        except AudioError as err:
            raise AudioError(f"training clip {i}: {err}") from err
        n = min(len(u), len(m))
        units.append(np.pad(u[:n], (0, CROP)))  # padded so every crop start fits; masked below
        mels.append(np.pad(m[:n], ((0, CROP), (0, 0))))
    if not units:
        raise DataError("train_conv_vocoder got no audio clips")
    lengths = np.array([len(u) - CROP for u in units])
    warmup = min(50, cfg.steps // 10 + 1)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1)),
                      weight_decay=1e-4)
    params = init_params(tokenizer.num_units, codec_cfg.n_mels, cfg, seed)
    state = opt.init(params)

    @jax.jit
    def step(params, state, u, m, mask):
        def loss_fn(p):
            err = jnp.abs(forward(p, u, cfg) - m).mean(-1)
            return (err * mask).sum() / mask.sum()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    for _ in range(cfg.steps):
        clips = rng.integers(len(units), size=cfg.batch)
        starts = [rng.integers(max(lengths[c] - CROP // 2, 1)) for c in clips]
        u = np.stack([units[c][s:s + CROP] for c, s in zip(clips, starts)])
        m = np.stack([mels[c][s:s + CROP] for c, s in zip(clips, starts)])
        mask = np.stack([(s + np.arange(CROP)) < lengths[c] for c, s in zip(clips, starts)])
        params, state, _ = step(params, state, u, m, mask.astype(np.float32))
    return ConvUnitVocoder(params, cfg, codec_cfg, tokenizer.num_units)
