"""The peer: the same architecture in transformers + torch on the CPU, with random weights.

A benchmark ratio only means something if both sides compute the same network on the same
batch, so the peer's config is written by `slm.convert.hf_config` (the code that exports slm
models to Hugging Face) and the slm config must be the text-only shape transformers can hold:
one temporal stream predicting the whole vocabulary, no depth decoder.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from slm.bench.machine import best_seconds
from slm.config import Config
from slm.convert.hf_config import hf_config_json
from slm.errors import ConfigError
from slm.model.precision import compute_dtype
from slm.types import build_streams
from slm.vocab import Vocab

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def check_text_only(config: Config, vocab: Vocab) -> None:
    """Refuse configs whose slm network has no transformers twin."""
    streams = build_streams(config.model, vocab)
    whole = ((0, vocab.size),)
    if len(streams) != 1 or streams[0].head != "temporal" or streams[0].spans != whole:
        raise ConfigError(
            "--vs hf needs a text-only model: one temporal stream over every vocabulary range "
            f"(spans {whole}), got {[(s.name, s.head, s.spans) for s in streams]}; use "
            "configs/bench/llama30m.yaml or a config shaped like it")
    if peer_dtype(config) not in TORCH_DTYPES:
        raise ConfigError(f"model.dtype={config.model.dtype!r}: the peer runs "
                          f"{' or '.join(TORCH_DTYPES)}")


def peer_dtype(config: Config) -> str:
    """The compute dtype both sides run: the peer is torch on CPU, so `auto` means float32."""
    return compute_dtype(config.model.dtype, "cpu")


def best_seconds_over_threads(fn: Callable[[], object], repeats: int) -> tuple[float, int]:
    """The fastest call of `fn` with torch on every core this process may use and on one, and
    that thread count: on a loaded machine torch's threads wait on each other, and the peer
    should not be judged by that."""
    import torch

    timings = []
    for threads in sorted({len(os.sched_getaffinity(0)), 1}, reverse=True):
        torch.set_num_threads(threads)
        timings.append((best_seconds(fn, repeats), threads))
    return min(timings)


def build_hf_model(config: Config, vocab: Vocab):
    """A randomly initialised transformers causal LM shaped like `config.model`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_text_only(config, vocab)
    torch.manual_seed(config.seed)
    fields = hf_config_json(config.model, vocab.size, config.model.tie_embeddings,
                            "float32", None)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")


def _autocast(config: Config):
    import contextlib

    import torch

    if peer_dtype(config) == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, TORCH_DTYPES[peer_dtype(config)]))


def train_step_fn(config: Config, vocab: Vocab, tokens_bt: np.ndarray) -> Callable[[], None]:
    """One call = one optimizer step on `tokens_bt`: forward, backward, global-norm clipping and
    AdamW with the slm config's hyper-parameters, as the slm train step does."""
    import torch

    model = build_hf_model(config, vocab).train()
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                  eps=o.eps, weight_decay=o.weight_decay)
    ids = torch.from_numpy(np.asarray(tokens_bt, np.int64))

    def step() -> None:
        with _autocast(config):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generate_fn(config: Config, vocab: Vocab, prompt_bt: np.ndarray,
                new_tokens: int) -> Callable[[], np.ndarray]:
    """One call = `generate()` of exactly `new_tokens` greedy tokens per row after the prompt
    (min_new_tokens keeps an end-of-sequence token from stopping it early)."""
    import torch
    from transformers import GenerationConfig

    model = build_hf_model(config, vocab).eval()
    ids = torch.from_numpy(np.asarray(prompt_bt, np.int64))
    settings = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=vocab.pad_id,
                                eos_token_id=vocab.eos_id, use_cache=True)

    def generate() -> np.ndarray:
        with torch.inference_mode(), _autocast(config):
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 generation_config=settings)
        return out[:, ids.shape[1]:].numpy()

    return generate
