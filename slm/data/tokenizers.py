"""The three tokenizers a corpus is prepared with, trained and saved together.

Text (sentencepiece or a pretrained LLM's tokenizer), phonetic units (frame features + k-means)
and an acoustic codec (built-in RVQ or Mimi/EnCodec) are only meaningful as a set: the
vocabulary is built from all three, and a checkpoint refuses tokenizers whose vocabulary
differs from its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from slm.config import Config, TokenizersConfig
from slm.errors import ConfigError
from slm.speech.codec import Codec, RVQCodec, RVQConfig, train_rvq_codec
from slm.speech.ctc_units import CTCFrameEncoder, train_ctc_encoder
from slm.speech.features import FeatureConfig
from slm.speech.recognizer import FEATURES, log_mel
from slm.speech.conv_vocoder import KIND as CONV_KIND
from slm.speech.conv_vocoder import ConvUnitVocoder, ConvVocoderConfig, train_conv_vocoder
from slm.speech.unit_vocoder import CONFIG_FILE as VOCODER_CONFIG
from slm.speech.unit_vocoder import UnitVocoder, train_unit_vocoder
from slm.speech.units import PhoneticTokenizer, train_phonetic_tokenizer
from slm.text import TextTokenizer, load_text_tokenizer, train_sentencepiece
from slm import atomic
from slm.vocab import Vocab

INDEX_FILE = "tokenizers.json"
VOCAB_FILE = "vocab.json"  # the vocabulary these tokenizers make, readable without loading them


class Heard(NamedTuple):
    units: np.ndarray  # int32 [T] local unit ids
    codes: np.ndarray  # int32 [Q, T'] local codec codes
    frames: np.ndarray  # float32 [T, D] the unit encoder's states
    log_mel: np.ndarray  # float32 [T, mels] the inputs of a model's own encoder (slm.model.speech_encoder)


@dataclasses.dataclass
class TokenizerSet:
    text: TextTokenizer
    units: PhoneticTokenizer
    codec: Codec
    codec_spec: dict
    vocoder: UnitVocoder | ConvUnitVocoder  # speaks units (strategies whose speech is units)

    def listen(self, wave: np.ndarray, sample_rate: int) -> Heard:
        """Every view a spoken user turn has: local units, codec codes and the frames models
        that hear features read (the unit encoder's states, or log-mels for their own encoder)."""
        units, states = self.units.encode_frames(wave, sample_rate)
        return Heard(units, self.codec.encode(wave, sample_rate), states.astype(np.float32),
                     speech_frames(wave, sample_rate, "log_mel"))

    def frame_width(self, features: str) -> int:
        """The width of the frames `listen(..., features)` gives."""
        return self.units.centroids.dim if features == "states" else FEATURES.dim

    def vocab(self, extra_specials: Sequence[str] = ()) -> Vocab:
        return Vocab.build(
            text_size=len(self.text.pieces()), num_units=self.units.num_units,
            num_codebooks=self.codec.num_codebooks, codebook_size=self.codec.codebook_size,
            extra_specials=extra_specials, text_pieces=self.text.pieces(),
        )

    def save(self, directory: str | Path) -> None:
        """Write the index last, so a directory with `tokenizers.json` is always complete."""
        directory = Path(directory)
        self.units.save(directory / "units")
        if isinstance(self.units.encoder, CTCFrameEncoder):
            self.units.encoder.save(directory)
        self.vocoder.save(directory / "vocoder")
        self.vocab().save(directory / VOCAB_FILE)
        index = {"text": self.text.spec(), "units": "units", "codec": self.codec_spec,
                 "vocoder": "vocoder"}
        atomic.write_json(directory / INDEX_FILE, index)

    @classmethod
    def load(cls, directory: str | Path) -> "TokenizerSet":
        directory = Path(directory)
        index = read_index(directory)
        units = PhoneticTokenizer.load(directory / index["units"],
                                       make_encoder=lambda spec: _load_encoder(spec, directory))
        return cls(load_text_tokenizer(index["text"]), units, load_codec(index["codec"], directory),
                   index["codec"], load_unit_vocoder(directory / index["vocoder"]))


def speech_frames(wave: np.ndarray, sample_rate: int, features: str) -> np.ndarray:
    """The encoder inputs `tokenizers.features: log_mel` keeps: the corpus recognizer's
    normalized log-mels at 50 Hz, one per unit frame of the 50 Hz unit encoders."""
    if features != "log_mel":
        raise ConfigError(f"tokenizers.features={features!r}; choose 'states' (the unit "
                          "encoder's states) or 'log_mel' (inputs of model.speech_input.encoder)")
    return log_mel(wave, sample_rate)


def read_index(directory: str | Path) -> dict:
    """What a tokenizers directory holds (`tokenizers.json`): each tokenizer's spec."""
    index_path = Path(directory) / INDEX_FILE
    if not index_path.is_file():
        raise ConfigError(
            f"{directory}: no {INDEX_FILE}; train tokenizers first (`slm tokenizers train`)"
        )
    return json.loads(index_path.read_text())


def instruction_tokenizer(config: Config) -> TextTokenizer | None:
    """The text tokenizer of `tokenizers.dir`, which instruction prompts are written with
    (`strategy.task_format.style: instruction`); None for the other styles, which need none."""
    if config.strategy.task_format.style != "instruction" or not config.tokenizers.dir:
        return None
    return load_text(config.tokenizers.dir)


def load_text(directory: str | Path) -> TextTokenizer:
    """The text tokenizer of a tokenizers directory alone."""
    return load_text_tokenizer(read_index(directory)["text"])


def _load_encoder(spec: dict, directory: Path):
    if spec.get("kind") == "ctc":
        return CTCFrameEncoder.load(spec, directory)
    from slm.speech.hf_encoders import HFFrameEncoder

    return HFFrameEncoder.from_spec(spec)


def load_codec(spec: dict, base: Path) -> Codec:
    if spec["kind"] == "rvq":
        return RVQCodec.load(base / spec["dir"])
    if spec["kind"] == "hf":
        from slm.speech.hf_encoders import HFCodec

        return HFCodec(spec["model_dir"], spec.get("num_codebooks"))
    raise ConfigError(f"codec kind {spec['kind']!r} is unknown; choose 'rvq' or 'hf'")


def train_tokenizers(cfg: TokenizersConfig, texts: Iterable[str],
                     waves: list[tuple[np.ndarray, int]], out_dir: str | Path, seed: int = 0,
                     transcribed: tuple[list[np.ndarray], list[str]] | None = None,
                     vocoder_waves: list[tuple[np.ndarray, int]] | None = None) -> TokenizerSet:
    """Fit text, unit and codec tokenizers on a corpus and save them to `out_dir`.

    `transcribed` (16 kHz waves and their normalized transcripts) trains the recognizer behind
    `unit_features: ctc`; `vocoder_waves` (default: `waves`) are what the unit vocoder learns
    to sound like, e.g. only the assistant's own voice."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.hf_text_dir:
        text = load_text_tokenizer({"kind": "hf", "model_dir": cfg.hf_text_dir})
    else:
        text = train_sentencepiece(texts, out_dir / "text", cfg.text_vocab_size,
                                   model_type=cfg.text_model, seed=seed)
    units = train_phonetic_tokenizer(waves, _unit_frames(cfg, transcribed, seed), cfg.num_units,
                                     seed=seed, dedup=cfg.dedup_units)
    if cfg.codec == "rvq":
        codec = train_rvq_codec(waves, RVQConfig(num_codebooks=cfg.num_codebooks,
                                                 codebook_size=cfg.codebook_size), seed=seed)
        codec.save(out_dir / "codec")
        codec_spec = {"kind": "rvq", "dir": "codec"}
    elif cfg.codec == "hf":
        codec_spec = {"kind": "hf", "model_dir": str(Path(cfg.hf_codec_dir).absolute()),
                      "num_codebooks": cfg.num_codebooks}
        codec = load_codec(codec_spec, out_dir)
    else:
        raise ConfigError(f"tokenizers.codec={cfg.codec!r}; choose 'rvq' or 'hf'")
    tokenizers = TokenizerSet(text, units, codec, codec_spec,
                              _train_vocoder(cfg, units, vocoder_waves or waves, seed))
    tokenizers.save(out_dir)
    return tokenizers


def _train_vocoder(cfg: TokenizersConfig, units: PhoneticTokenizer, waves, seed: int):
    if cfg.unit_vocoder == "mean":
        return train_unit_vocoder(units, waves)
    if cfg.unit_vocoder == "conv":
        return train_conv_vocoder(units, waves, cfg=ConvVocoderConfig(steps=cfg.unit_vocoder_steps),
                                  seed=seed)
    raise ConfigError(f"tokenizers.unit_vocoder={cfg.unit_vocoder!r}; choose 'mean' or 'conv'")


def load_unit_vocoder(directory: Path) -> UnitVocoder | ConvUnitVocoder:
    """Either kind of unit vocoder, told apart by the kind its config records."""
    kind = json.loads((directory / VOCODER_CONFIG).read_text()).get("kind") \
        if (directory / VOCODER_CONFIG).is_file() else None
    return ConvUnitVocoder.load(directory) if kind == CONV_KIND else UnitVocoder.load(directory)


def _unit_frames(cfg: TokenizersConfig, transcribed, seed: int):
    if cfg.unit_features in ("logmel", "mfcc"):
        return FeatureConfig(kind=cfg.unit_features, frame_rate=cfg.unit_frame_rate)
    if cfg.unit_features == "ctc":
        if transcribed is None:
            raise ConfigError("tokenizers.unit_features='ctc' trains a recognizer, which needs "
                              "transcribed speech: fit the tokenizers on a corpus (`slm tokenizers "
                              "train --corpus ...`), or choose 'mfcc', 'logmel' or 'hf'")
        if cfg.unit_frame_rate != FEATURES.frame_rate:
            raise ConfigError(f"tokenizers.unit_features='ctc' gives units at "
                              f"{FEATURES.frame_rate} Hz; set tokenizers.unit_frame_rate to it")
        return train_ctc_encoder(*transcribed, cfg.unit_encoder_steps, seed)
    if cfg.unit_features == "hf":
        from slm.speech.hf_encoders import HFFrameEncoder

        return HFFrameEncoder(cfg.hf_encoder_dir, cfg.hf_encoder_layer)
    raise ConfigError(
        f"tokenizers.unit_features={cfg.unit_features!r}; choose 'logmel', 'mfcc', 'ctc' or 'hf'"
    )
