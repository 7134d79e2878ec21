"""`slm convert to-hf`: the text part of an slm checkpoint as a transformers model directory.

The exported model is what the slm model computes on text alone: the text range of the
embedding (rows `[text.start, text.stop)`, HF id = slm id - text.start, see slm.convert.expand),
the text stream's head columns for those ids, and the decoder. Speech rows, other streams'
heads and a depth decoder are left out. The text stream's learned stream vector is folded into
the exported embedding (divided by the stream count under `stream_combine: mean`), so a model
fine-tuned in slm keeps its text behaviour; when that makes the embedding differ from a tied
head, the export unties them. Tensors are written one at a time (slm.convert.tensors).
The config.json and tokenizer files kept at import (`hf/`) are carried over; a checkpoint
trained from scratch exports a config built from its ModelConfig and no tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from slm.config import Config
from slm.convert.hf_config import hf_config_json
from slm.convert.hf_import import HF_DIR
from slm.convert.layout import EMBED, FINAL_NORM, LM_HEAD, layer_tensors
from slm.convert.tensors import write_safetensors
from slm.errors import CheckpointError, ConfigError
from slm.types import StreamSpec, build_streams
from slm.vocab import Vocab

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclasses.dataclass
class ExportResult:
    out: Path
    family: str
    vocab_size: int
    tied: bool


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def _text_stream(config: Config, vocab: Vocab) -> tuple[int, StreamSpec, int]:
    """(index among all streams, the stream, first head column of the text ids) of the temporal
    stream that predicts the whole text range."""
    text, column = vocab.range("text"), 0
    for k, stream in enumerate(build_streams(config.model, vocab)):
        if stream.head != "temporal":
            continue
        local = 0
        for a, b in stream.spans:
            if a <= text.start and text.stop <= b:
                return k, stream, column + local + text.start - a
            local += b - a
        column += stream.size
    raise ConfigError("model.streams: no temporal stream predicts the whole 'text' range, so "
                      "there is no text model to export")


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32",
              step: int | None = None) -> ExportResult:
    from flax import nnx

    from slm.convert.hf_config import family_of
    from slm.train.adapters import base_of
    from slm.train.checkpoint import load_model

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    checkpoint, out = Path(checkpoint).absolute(), Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new --out or remove it")
    model, config, vocab = load_model(checkpoint, step)
    params = nnx.to_pure_dict(nnx.state(model))
    m, text = config.model, vocab.range("text")
    family = family_of(m)
    k, _, column = _text_stream(config, vocab)
    num_streams = len(config.model.streams)
    table = params["embed"]["table"]
    stream_vec = _host(params["embed"]["stream"][k])
    divisor = num_streams if m.stream_combine == "mean" else 1

    def embedding() -> np.ndarray:
        return (_host(table[text.start:text.stop]) + stream_vec) / divisor

    folds = bool(stream_vec.any()) or divisor != 1
    tied = m.tie_embeddings and not folds
    if m.tie_embeddings:
        head = lambda: _host(table[text.start:text.stop])  # noqa: E731
    else:
        head = lambda: _host(params["heads"]["w"][:, column:column + text.size]).T  # noqa: E731
    d, np_dtype = m.d_model, DTYPES[dtype]
    tensors = [(EMBED, (text.size, d), np_dtype, embedding)]
    layers = params["decoder"]["layers"]
    for i in range(m.num_layers):
        for t in layer_tensors(m):
            leaf = layers
            for key in t.path:
                leaf = leaf[key]
            tensors.append((t.hf_name(i), t.hf_shape, np_dtype,
                            lambda leaf=leaf, i=i, t=t: t.to_hf(_host(leaf[i]))))
    tensors.append((FINAL_NORM, (d,), np_dtype,
                    lambda: _host(params["decoder"]["final_norm"]["scale"])))
    if not tied:
        tensors.append((LM_HEAD, (text.size, d), np_dtype, head))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    kept = (base_of(checkpoint) or checkpoint) / HF_DIR  # an adapter's tokenizer is its base's
    base = json.loads((kept / "config.json").read_text()) if (kept / "config.json").is_file() \
        else None
    hf_cfg = hf_config_json(m, text.size, tied, dtype, base)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if kept.is_dir():
        for path in kept.iterdir():
            if path.is_file() and path.name != "config.json":
                shutil.copy2(path, out / path.name)
    return ExportResult(out, family, text.size, tied)
