"""Pretrained speech models from transformers, behind slm's two speech protocols.

* `HFFrameEncoder` turns a wave into the hidden states of one layer of a self-supervised
  encoder (HuBERT, WavLM, wav2vec2): the frame features that k-means clusters into units.
* `HFCodec` turns a wave into residual-codebook codes and back with a neural codec (Mimi,
  EnCodec): the acoustic streams of the token grid.

Both read a model saved with `save_pretrained` from a local directory and never touch the
network. Torch is imported only here, inside the classes: training runs in JAX, and the rest of
slm must import on machines that have no torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slm.errors import AudioError, ConfigError, MissingToolError, VocabError
from slm.speech.audio import resample

SSL_SAMPLE_RATE = 16000  # every HuBERT/WavLM/wav2vec2 checkpoint was pretrained on 16 kHz audio


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:
        raise MissingToolError(
            "pretrained speech encoders and codecs need PyTorch; install the CPU wheel: "
            "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
        ) from err
    return torch


def _model_dir(model_dir: str | Path) -> Path:
    """The directory as an absolute path, so a saved spec still finds it from another cwd."""
    path = Path(model_dir).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a transformers model directory (no config.json); "
                          f"download the model once and save it there with save_pretrained")
    return path


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{path}/config.json: transformers cannot read it ({err})") from err


def _load_model(path: Path, device: str) -> Any:
    """Float32 weights in eval mode: features and codes must not depend on dropout or dtype."""
    torch = _import_torch()
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot load the model weights ({err})") from err
    return model.to(device).eval()


def _mono(wave: np.ndarray, who: str) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise AudioError(f"{who} needs a non-empty mono wave of shape [samples], got shape {wave.shape}; "
                         f"read files with slm.speech.audio.load_audio, which mixes to mono")
    return wave


# --- self-supervised frame encoders -------------------------------------------------------

def _checked_layer(layer: int, config: Any) -> int:
    """Hidden state 0 is the transformer's input, 1..N the outputs of its N layers."""
    top = config.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= top:
        raise ConfigError(f"layer={layer!r} is invalid; use an integer in 0..{top}, "
                          f"the hidden states of this {config.model_type} model")
    return layer


def _conv_front_end(config: Any) -> list[tuple[int, int]]:
    """(kernel, stride) of each convolution that turns samples into frames."""
    if not hasattr(config, "conv_stride"):
        raise ConfigError(f"model_type={config.model_type!r} has no convolutional front end (conv_stride); "
                          f"use a HuBERT, WavLM or wav2vec2 checkpoint")
    return list(zip(config.conv_kernel, config.conv_stride))


def _min_samples(front_end: list[tuple[int, int]]) -> int:
    """The shortest wave that yields one frame: the receptive field of the conv stack."""
    need = 1
    for kernel, stride in reversed(front_end):
        need = (need - 1) * stride + kernel
    return need


def _feature_extractor(path: Path) -> Any | None:
    """The checkpoint's input normalisation, if it ships one (large models expect zero-mean,
    unit-variance waves; base models expect raw ones)."""
    from transformers import AutoFeatureExtractor
    from transformers.utils import FEATURE_EXTRACTOR_NAME

    if not (path / FEATURE_EXTRACTOR_NAME).is_file():
        return None
    return AutoFeatureExtractor.from_pretrained(path, local_files_only=True)


class HFFrameEncoder:
    """Hidden states of one layer of a HuBERT/WavLM/wav2vec2 model, one row per frame."""

    def __init__(self, model_dir: str | Path, layer: int, device: str = "cpu"):
        _import_torch()  # say how to install it before doing any other work
        self.model_dir = _model_dir(model_dir)
        config = _load_config(self.model_dir)
        self.layer = _checked_layer(layer, config)
        front_end = _conv_front_end(config)
        self._extractor = _feature_extractor(self.model_dir)
        self.sample_rate = int(getattr(self._extractor, "sampling_rate", SSL_SAMPLE_RATE))
        self.frame_rate = self.sample_rate / math.prod(stride for _, stride in front_end)
        self._min_samples = _min_samples(front_end)
        self._device = device
        self._model = _load_model(self.model_dir, device)

    def spec(self) -> dict:
        """What `from_spec` needs to rebuild this encoder, e.g. when a unit tokenizer is reloaded."""
        return {"kind": "hf", "model_dir": str(self.model_dir), "layer": self.layer}

    @classmethod
    def from_spec(cls, spec: dict, device: str = "cpu") -> HFFrameEncoder:
        if spec.get("kind") != "hf":
            raise ConfigError(f"frame encoder spec has kind={spec.get('kind')!r}; HFFrameEncoder reads kind 'hf'")
        return cls(spec["model_dir"], spec["layer"], device)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """[T, D] float32 features of a mono wave at `sample_rate`."""
        torch = _import_torch()
        wave = _mono(wave, "HFFrameEncoder")
        if wave.size < self._min_samples:
            raise AudioError(f"a clip of {wave.size} samples is shorter than the encoder's receptive field "
                             f"({self._min_samples} samples at {self.sample_rate} Hz)")
        with torch.inference_mode():
            out = self._model(self._inputs(wave), output_hidden_states=True)
        return out.hidden_states[self.layer][0].float().cpu().numpy()

    def _inputs(self, wave: np.ndarray) -> Any:
        torch = _import_torch()
        if self._extractor is None:
            return torch.from_numpy(wave)[None].to(self._device)
        batch = self._extractor(wave, sampling_rate=self.sample_rate, return_tensors="pt")
        return batch["input_values"].to(self._device)


# --- neural codecs --------------------------------------------------------------------------

class _Mimi:
    """Kyutai's Mimi: 12.5 Hz at 24 kHz; codebook 0 is distilled from WavLM, the rest acoustic."""

    def __init__(self, config: Any, model: Any):
        self.frame_rate = float(config.frame_rate)  # sampling_rate / (prod(upsampling_ratios) * 2)
        self.codebook_counts = list(range(1, config.num_quantizers + 1))
        self._model = model

    def encode(self, x: Any, num_codebooks: int) -> Any:
        return self._model.encode(x, num_quantizers=num_codebooks).audio_codes[0]

    def decode(self, codes: Any) -> Any:
        return self._model.decode(codes[None]).audio_values[0]


class _Encodec:
    """Meta's EnCodec: the number of codebooks follows from a bandwidth the model was trained for."""

    def __init__(self, config: Any, model: Any):
        if config.chunk_length_s is not None or config.normalize or config.audio_channels != 1:
            raise ConfigError(
                f"EnCodec with chunk_length_s={config.chunk_length_s}, normalize={config.normalize}, "
                f"audio_channels={config.audio_channels} is not supported: its per-chunk loudness scales are not "
                f"part of [Q, T] codes; use a mono, unchunked model such as encodec_24khz")
        self.frame_rate = config.sampling_rate / config.hop_length  # hop_length = prod(upsampling_ratios)
        rvq = model.quantizer
        self._bandwidths = {rvq.get_num_quantizers_for_bandwidth(bw): bw for bw in config.target_bandwidths}
        self.codebook_counts = sorted(self._bandwidths)
        self._model = model

    def encode(self, x: Any, num_codebooks: int) -> Any:
        return self._model.encode(x, bandwidth=self._bandwidths[num_codebooks]).audio_codes[0, 0]

    def decode(self, codes: Any) -> Any:
        return self._model.decode(codes[None, None], [None]).audio_values[0]


_FAMILIES = {"mimi": _Mimi, "encodec": _Encodec}


def _codec_family(model_type: str) -> type[_Mimi] | type[_Encodec]:
    if model_type not in _FAMILIES:
        raise ConfigError(f"model_type={model_type!r} is not a supported codec; use one of {', '.join(_FAMILIES)}")
    return _FAMILIES[model_type]


def _checked_codebooks(num_codebooks: int | None, counts: list[int], model_type: str) -> int:
    """The requested codebook count, or the most the model has."""
    if num_codebooks is None:
        return counts[-1]
    if num_codebooks not in counts:
        raise ConfigError(f"num_codebooks={num_codebooks} is not available; this {model_type} model "
                          f"encodes with {counts} codebooks")
    return num_codebooks


class HFCodec:
    """A Mimi or EnCodec model from transformers as slm's codec: wave <-> int32 codes [Q, T]."""

    def __init__(self, model_dir: str | Path, num_codebooks: int | None = None, device: str = "cpu"):
        _import_torch()  # say how to install it before doing any other work
        self.model_dir = _model_dir(model_dir)
        config = _load_config(self.model_dir)
        family = _codec_family(config.model_type)  # checked before loading weights we cannot use
        self._device = device
        self._family = family(config, _load_model(self.model_dir, device))
        self.model_type = config.model_type
        self.sample_rate = int(config.sampling_rate)
        self.frame_rate = self._family.frame_rate
        self.codebook_size = int(config.codebook_size)
        self.num_codebooks = _checked_codebooks(num_codebooks, self._family.codebook_counts, self.model_type)

    def spec(self) -> dict:
        return {"kind": "hf", "model_dir": str(self.model_dir), "num_codebooks": self.num_codebooks}

    def encode(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """int32 codes [num_codebooks, T] of a mono wave, resampled to the codec's rate first."""
        torch = _import_torch()
        wave = resample(_mono(wave, "HFCodec.encode"), sample_rate, self.sample_rate)
        x = torch.from_numpy(wave)[None, None].to(self._device)
        with torch.inference_mode():
            codes = self._family.encode(x, self.num_codebooks)
        return codes.cpu().numpy().astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """A float32 mono wave at `sample_rate` from codes [num_codebooks, T]."""
        torch = _import_torch()
        codes = self._checked_codes(codes)
        with torch.inference_mode():
            wave = self._family.decode(torch.from_numpy(codes).long().to(self._device))
        return wave.mean(dim=0).float().cpu().numpy()

    def decode_batch(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`decode` of each grid in turn: a neural decoder is fast per reply, and batching
        replies of different lengths would need the model's own padding rules."""
        return [self.decode(c) for c in codes]

    def _checked_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks or codes.dtype.kind not in "iu":
            raise VocabError(f"codes must be integers of shape [{self.num_codebooks}, T], "
                             f"got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise VocabError(f"codes must lie in [0, {self.codebook_size}), "
                             f"got values in [{codes.min()}, {codes.max()}]")
        return codes.astype(np.int64)
