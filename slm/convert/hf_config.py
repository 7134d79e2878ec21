"""Hugging Face `config.json` <-> slm `ModelConfig` for the Llama, Qwen2 and Gemma families.

The raw JSON is read here rather than through `transformers.AutoConfig`, so that every field
that would change what the network computes is checked by name, and a checkpoint we cannot
reproduce exactly (scaled RoPE, sliding windows, biases we do not model...) is refused with the
field and its value instead of being converted into a model that silently differs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from slm.config import ModelConfig
from slm.errors import ConfigError

FAMILIES = {  # model_type -> (architecture, defaults that transformers applies when a key is absent)
    "llama": ("LlamaForCausalLM", {"hidden_act": "silu", "tie_word_embeddings": False}),
    "qwen2": ("Qwen2ForCausalLM", {"hidden_act": "silu", "tie_word_embeddings": False}),
    "gemma": ("GemmaForCausalLM", {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
}
# transformers' activation names -> ModelConfig.mlp_activation (and back, first name wins)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
# Switches that would change the computation in ways slm does not model: (field, allowed values).
UNSUPPORTED_IF_SET = {
    "llama": (("attention_bias", (False, None)), ("mlp_bias", (False, None))),
    "qwen2": (("use_sliding_window", (False, None)),),
    "gemma": (("attention_bias", (False, None)), ("use_bidirectional_attention", (False, None))),
}


@dataclasses.dataclass(frozen=True)
class HFModel:
    """What slm needs to know about an imported checkpoint."""

    family: str
    vocab_size: int  # rows of the embedding (the text range of the slm vocabulary)
    fields: dict  # ModelConfig fields that describe the architecture
    raw: dict  # config.json as read, kept so an export can carry token ids and metadata back


def read_config_json(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; --model-dir must be a transformers checkpoint "
                          "directory (config.json, *.safetensors, tokenizer files)")
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A transformers JSON file (config.json, preprocessor_config.json) that must be an object."""
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def _fail(where: str, field: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: `{field}` {problem}; {fix}")


def _rope_theta(cfg: dict, where: str) -> float:
    """RoPE base; only the plain (unscaled) rotary embedding is reproduced exactly."""
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    for field, entry in (("rope_parameters", params), ("rope_scaling", legacy)):
        kind = entry.get("rope_type", entry.get("type")) if isinstance(entry, dict) else entry
        if kind not in (None, "default"):
            raise _fail(where, field, f"asks for rope_type {kind!r}",
                        "only unscaled RoPE (rope_type 'default') converts exactly; use a "
                        "checkpoint without RoPE scaling")
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _fail(where, "partial_rotary_factor", "is not 1.0", "slm rotates whole heads")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def hf_model(cfg: dict, where: str) -> HFModel:
    """Check a `config.json` and derive the slm architecture it describes."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise _fail(where, "model_type", f"is {model_type!r}",
                    f"supported model types are {', '.join(sorted(FAMILIES))} "
                    "(Llama, Qwen2, Gemma causal LMs)")
    architecture, defaults = FAMILIES[model_type]
    architectures = cfg.get("architectures") or [architecture]
    if architectures != [architecture]:
        raise _fail(where, "architectures", f"is {architectures}",
                    f"only [{architecture!r}] (a causal LM with its head) converts for {model_type}")
    missing = [k for k in REQUIRED if not isinstance(cfg.get(k), int)]
    if missing:
        raise _fail(where, missing[0], "is missing or not an integer", "fix config.json")
    if cfg.get("quantization_config"):
        raise _fail(where, "quantization_config", "is set",
                    "convert the unquantized checkpoint (fp32/bf16/fp16 weights)")
    for field, allowed in UNSUPPORTED_IF_SET[model_type]:
        if cfg.get(field) not in allowed:
            raise _fail(where, field, f"is {cfg.get(field)!r}",
                        f"slm converts {model_type} only with {field}={allowed[0]!r}")
    layer_types = set(cfg.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise _fail(where, "layer_types", f"holds {sorted(layer_types)}",
                    "sliding-window layers are not supported; only full attention converts")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or defaults["hidden_act"]
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers reads Gemma's legacy "gelu" as the tanh form
    if act not in ACTIVATIONS:
        raise _fail(where, "hidden_act", f"is {act!r}",
                    f"supported activations are {', '.join(sorted(ACTIVATIONS))}")
    heads = cfg["num_attention_heads"]
    fields = dict(
        d_model=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        mlp_dim=cfg["intermediate_size"],
        max_seq_len=int(cfg.get("max_position_embeddings") or ModelConfig.max_seq_len),
        rope_theta=_rope_theta(cfg, where), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
        qkv_bias=model_type == "qwen2", norm_plus_one=model_type == "gemma",
        scale_embeddings=model_type == "gemma", mlp_activation=ACTIVATIONS[act],
    )
    return HFModel(model_type, cfg["vocab_size"], fields, cfg)


def family_of(model: ModelConfig) -> str:
    """The HF family that computes what `model` computes, for export."""
    gemma_like = (model.norm_plus_one, model.scale_embeddings)
    if model.qkv_bias and not any(gemma_like):
        return "qwen2"
    if all(gemma_like) and not model.qkv_bias:
        return "gemma"
    if not any(gemma_like) and not model.qkv_bias:
        return "llama"
    raise ConfigError(f"model: qkv_bias={model.qkv_bias}, norm_plus_one={model.norm_plus_one}, "
                      f"scale_embeddings={model.scale_embeddings} match no Hugging Face family "
                      "(Llama: none, Qwen2: qkv_bias, Gemma: norm_plus_one and scale_embeddings)")


def hf_config_json(model: ModelConfig, vocab_size: int, tied: bool, dtype: str,
                   base: dict | None) -> dict:
    """A `config.json` for the text part of `model`; `base` (the imported one) keeps its token
    ids and other metadata, and every field that shapes the network is written afresh."""
    family = family_of(model)
    act = next(k for k, v in ACTIVATIONS.items() if v == model.mlp_activation)
    cfg = {k: v for k, v in (base or {}).items()
           if k not in ("rope_scaling", "rope_theta", "hidden_activation", "torch_dtype",
                        "transformers_version", "quantization_config")}
    cfg.update(
        architectures=[FAMILIES[family][0]], model_type=family, vocab_size=vocab_size,
        hidden_size=model.d_model, intermediate_size=model.mlp_dim,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.d_model // model.num_heads, hidden_act=act,
        max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        tie_word_embeddings=tied, dtype=dtype,
    )
    if family == "qwen2":
        cfg.update(use_sliding_window=False, layer_types=["full_attention"] * model.num_layers)
    else:
        cfg.update(attention_bias=False)
    return cfg

