"""Speech encoders in JAX, loaded from transformers model directories: the registry.

`load_encoder(model_dir)` reads `config.json`, picks the encoder its `model_type` names, checks
every field that changes what the network computes, and reads the weights from safetensors one
device shard at a time. The registry is the one place that maps a model_type to a module:
supporting a new encoder is one module with a `SpeechEncoder` subclass (its forward, its
config fields, its HF tensor names) and one `register_encoder` call, in slm or in another
package through an entry point in group `slm.encoders` (see slm.registry).
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from slm.convert.shard_reader import LoadStats
from slm.model.encoders.hf_weights import HFConfig, load_weights
from slm.model.encoders.transformer import EncoderOutput, SpeechEncoder
from slm.model.encoders.wav2vec import Wav2VecEncoder
from slm.model.encoders.whisper import WhisperEncoder, log_mel
from slm.registry import Registry

ENCODERS: Registry[type[SpeechEncoder]] = Registry(
    "speech encoder", "slm.encoders", "model_type", "slm.model.encoders.register_encoder")


def register_encoder(name: str, cls: type[SpeechEncoder]) -> None:
    """Make `cls` the encoder for config.json's `model_type` == `name`."""
    ENCODERS.register(name, cls)


register_encoder("whisper", WhisperEncoder)
register_encoder("hubert", Wav2VecEncoder)
register_encoder("wavlm", Wav2VecEncoder)


def load_encoder(model_dir: str | Path,
                 mesh: Mesh | None = None) -> tuple[SpeechEncoder, LoadStats]:
    """The encoder saved in `model_dir` (with `save_pretrained`), its parameters sharded on
    `mesh` by their logical axis names (on one device when None), and what loading cost."""
    hf = HFConfig(model_dir)
    model_type = hf.get("model_type")
    cls = ENCODERS.get(model_type)
    if cls is None:
        raise hf.fail("model_type", f"is {model_type!r}",
                      f"slm's speech encoders are {', '.join(ENCODERS.names())}; a new one is "
                      "registered with slm.model.encoders.register_encoder or through a Python "
                      "entry point in group 'slm.encoders'")
    prefix = hf.prefix(cls.ARCHITECTURES[model_type])
    spec = cls.spec_from_hf(hf)
    return load_weights(lambda: cls(spec, nnx.Rngs(0)), hf.dir, prefix, mesh)


__all__ = ["ENCODERS", "EncoderOutput", "LoadStats", "SpeechEncoder", "Wav2VecEncoder",
           "WhisperEncoder", "load_encoder", "log_mel", "register_encoder"]
