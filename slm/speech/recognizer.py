"""A small CTC speech recognizer: log-mel frames in, characters out, trained on a corpus.

It serves twice, as two separately trained models: as the judge that transcribes generated
speech (`slm.eval.judge`), and as the encoder of supervised phonetic units
(`slm.speech.ctc_units`), whose states know what was said and little of who said it.

Model: log-mel frames at 50 Hz (CMVN) -> two 1-D convolutions, the second with stride 2 ->
a few non-causal transformer layers at 25 Hz -> characters plus a CTC blank, trained with
`optax.ctc_loss` and AdamW. 25 Hz is the slowest rate CTC still fits: the fastest corpus speech
needs at most ~0.8 output frames per character (one per character, one between repeated
letters), and halving the rate roughly quarters the cost of attention and CTC on a CPU.
Parameters are a flat dict of arrays, so saving is one npz (never pickle) and one json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slm import atomic
from slm.errors import CheckpointError
from slm.speech.audio import resample
from slm.speech.features import FeatureConfig, extract

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # id 0 is the CTC blank, so character i is id i + 1
FEATURES = FeatureConfig(frame_rate=50.0)
PAD_FRAMES, PAD_BATCH = 64, 16  # inference shapes are rounded up to these, bounding recompiles


@dataclass(frozen=True)
class RecognizerConfig:
    d: int = 128
    layers: int = 3
    heads: int = 4
    kernel: int = 5
    batch: int = 32
    lr: float = 2e-3
    mask_frames: int = 8  # SpecAugment-style masks: widths of 2 time and 2 frequency masks,
    mask_bins: int = 10   # so the model leans on more than one voice's fine detail


def init_params(cfg: RecognizerConfig, seed: int | jax.Array) -> dict[str, jnp.ndarray]:
    """Fresh parameters from an integer seed or a PRNG key."""
    shapes = {"conv1.w": (cfg.kernel, FEATURES.dim, cfg.d), "conv2.w": (cfg.kernel, cfg.d, cfg.d),
              "out.w": (cfg.d, len(ALPHABET) + 1)}
    for i in range(cfg.layers):
        shapes |= {f"l{i}.qkv": (cfg.d, 3 * cfg.d), f"l{i}.o": (cfg.d, cfg.d),
                   f"l{i}.ff1": (cfg.d, 4 * cfg.d), f"l{i}.ff2": (4 * cfg.d, cfg.d)}
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    keys = jax.random.split(key, len(shapes))
    params = {name: jax.random.normal(k, s) / math.sqrt(math.prod(s[:-1]))
              for k, (name, s) in zip(keys, shapes.items())}
    for name, s in list(shapes.items()):  # biases, and a layer-norm scale per sublayer
        params[name.replace(".w", "") + ".b"] = jnp.zeros(s[-1])
    for ln in ["out.ln"] + [f"l{i}.{j}" for i in range(cfg.layers) for j in ("ln1", "ln2")]:
        params[ln] = jnp.ones(cfg.d)
    return params


def _ln(x, scale):
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * scale


def _conv(x_btf, w, b, runs_bt, stride=1):
    """A 'SAME' 1-D convolution (XLA's padding for an even length) in which no frame sees
    another utterance's: a tap counts only where its run id equals the output frame's, so one
    utterance gives the same states alone or packed beside others in a row."""
    k, length = w.shape[0], x_btf.shape[1]
    out = -(-length // stride)
    lo = max((out - 1) * stride + k - length, 0) // 2
    centre_o = jnp.arange(out) * stride
    runs_bo = runs_bt[:, centre_o]
    y = b
    for j in range(k):
        tap_o = centre_o - lo + j
        inside_o = (tap_o >= 0) & (tap_o < length)
        tap_o = jnp.clip(tap_o, 0, length - 1)
        same_bo = inside_o & (runs_bt[:, tap_o] == runs_bo) & (runs_bo > 0)
        y = y + (x_btf[:, tap_o] * same_bo[..., None]) @ w[j]
    return jax.nn.gelu(y)


def run_starts(runs_bt):
    """The index of each frame's run start (its utterance's first frame)."""
    index_t = jnp.arange(runs_bt.shape[1])
    new_bt = jnp.concatenate([jnp.ones_like(runs_bt[:, :1], bool),
                              runs_bt[:, 1:] != runs_bt[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(new_bt, index_t, 0), axis=1)


def encode(params, x_btf, runs_bt, cfg: RecognizerConfig):
    """`[B, ceil(T/2), d]` encoder states at 25 Hz (layer-normed), the features the output layer
    reads characters from. `runs_bt` numbers the utterances of each row (0: padding): attention
    sees its whole utterance (non-causal) and nothing else, positions count from its start.
    Utterances must start at even frames, where the stride-2 convolution is centred."""
    runs_bt = runs_bt.astype(jnp.int32)
    h = _conv(x_btf, params["conv1.w"], params["conv1.b"], runs_bt)
    h = _conv(h, params["conv2.w"], params["conv2.b"], runs_bt, 2)
    runs_bt = runs_bt[:, ::2]
    pos_bt = jnp.arange(h.shape[1]) - run_starts(runs_bt)
    angles = pos_bt[..., None] / 10_000 ** (jnp.arange(0, cfg.d, 2) / cfg.d)
    h = h + jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)
    same_b1tt = (runs_bt[:, None, :, None] == runs_bt[:, None, None, :]) & (runs_bt[:, None, None, :] > 0)
    bias_b1tt = jnp.where(same_b1tt, 0.0, -1e9)
    B, T, hd = h.shape[0], h.shape[1], cfg.d // cfg.heads
    for i in range(cfg.layers):
        p = lambda n: params[f"l{i}.{n}"]
        qkv = (_ln(h, p("ln1")) @ p("qkv") + p("qkv.b")).reshape(B, T, 3, cfg.heads, hd)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias_b1tt, -1)
        h = h + ((att @ v).transpose(0, 2, 1, 3).reshape(B, T, cfg.d) @ p("o") + p("o.b"))
        h = h + jax.nn.gelu(_ln(h, p("ln2")) @ p("ff1") + p("ff1.b")) @ p("ff2") + p("ff2.b")
    return _ln(h, params["out.ln"])


def forward(params, x_btf, runs_bt, cfg: RecognizerConfig):
    """`[B, ceil(T/2), classes]` character logits at 25 Hz."""
    return encode(params, x_btf, runs_bt, cfg) @ params["out.w"] + params["out.b"]


def _augment(key, x_btf, cfg: RecognizerConfig):
    """Zero two random time spans and two mel-bin spans per utterance."""
    B, T, F = x_btf.shape
    for axis, size, width in ((1, T, cfg.mask_frames), (2, F, cfg.mask_bins)):
        for _ in range(2):
            key, k1, k2 = jax.random.split(key, 3)
            w = jax.random.randint(k1, (B, 1), 0, width + 1)
            start = jax.random.randint(k2, (B, 1), 0, size)
            idx = jnp.arange(size)[None]
            keep = ~((idx >= start) & (idx < start + w))
            x_btf = x_btf * (keep[:, :, None] if axis == 1 else keep[:, None, :])
    return x_btf


def _loss(params, x, mask, labels, label_mask, cfg):
    logits = forward(params, x, mask, cfg)
    per_seq = optax.ctc_loss(logits, 1.0 - mask[:, ::2], labels, 1.0 - label_mask, blank_id=0)
    return per_seq.sum() / label_mask.sum()


class Recognizer:
    """A trained CTC model: greedy transcripts and encoder states of waves at any rate."""

    def __init__(self, params: dict, cfg: RecognizerConfig = RecognizerConfig()) -> None:
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.cfg = cfg
        self._logits = jax.jit(partial(forward, cfg=cfg))
        self._states = jax.jit(partial(encode, cfg=cfg))

    def _batches(self, waves: Sequence[np.ndarray], sample_rate: int, fn):
        """(fn's output, frame counts at 25 Hz) per padded batch; shapes are rounded up so a
        few compiled programs serve every clip length."""
        feats = [log_mel(w, sample_rate) for w in waves]
        batch = PAD_BATCH if len(feats) > 1 else 1  # one clip (a unit encoder's call) alone
        for start in range(0, len(feats), batch):
            chunk = feats[start:start + batch]
            x, mask = _pad(chunk + [chunk[0][:1]] * (batch - len(chunk)), PAD_FRAMES)
            yield np.asarray(fn(self.params, x, mask)), [(len(f) + 1) // 2 for f in chunk]

    def transcribe_raw_batch(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        return [_greedy(logits[i].argmax(-1)[:n])
                for logits, lengths in self._batches(waves, sample_rate, self._logits)
                for i, n in enumerate(lengths)]

    def transcribe_raw(self, wave: np.ndarray, sample_rate: int) -> str:
        return self.transcribe_raw_batch([wave], sample_rate)[0]

    def states(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[np.ndarray]:
        """`[T, d]` encoder states at 25 Hz per wave."""
        return [states[i, :n] for states, lengths in self._batches(waves, sample_rate, self._states)
                for i, n in enumerate(lengths)]

    def save(self, out_dir: str | Path, name: str) -> None:
        out_dir = Path(out_dir)
        atomic.write_npz(out_dir / f"{name}.npz", **{k: np.asarray(v) for k, v in self.params.items()})
        atomic.write_json(out_dir / f"{name}.json", {"config": asdict(self.cfg),
                                                     "alphabet": ALPHABET,
                                                     "features": FEATURES.to_dict()})

    @classmethod
    def load(cls, out_dir: str | Path, name: str):
        out_dir = Path(out_dir)
        try:
            meta = json.loads((out_dir / f"{name}.json").read_text("utf-8"))
            with np.load(out_dir / f"{name}.npz", allow_pickle=False) as arrays:
                params = dict(arrays)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{out_dir}: cannot read the {name} recognizer ({err}); "
                                  "train it again") from err
        if meta["alphabet"] != ALPHABET or meta["features"] != FEATURES.to_dict():
            raise CheckpointError(f"{out_dir}: the {name} recognizer was saved with other features "
                                  "or characters than this code uses; train it again")
        return cls(params, RecognizerConfig(**meta["config"]))


def train_recognizer(waves: Sequence[np.ndarray], texts: Sequence[str], steps: int = 1000,
                     seed: int = 0, cfg: RecognizerConfig = RecognizerConfig(),
                     log_every: int = 0) -> dict[str, jnp.ndarray]:
    """Parameters of a recognizer trained on `waves` (at FEATURES.sample_rate) and their
    normalized transcripts.

    Batches group utterances of similar length (sorted by jittered length, then shuffled) and
    are padded to a multiple of PAD_FRAMES, so the step compiles a few times and wastes little
    work on padding; the order comes from `seed` alone, so the same data and seed give the
    same model."""
    feats = [extract(w, FEATURES) for w in waves]
    labels = [[ALPHABET.index(c) + 1 for c in t if c in ALPHABET] for t in texts]
    lab_all = np.zeros((len(labels), max(map(len, labels))), np.int32)
    lab_mask = np.zeros(lab_all.shape, np.float32)
    for i, ids in enumerate(labels):
        lab_all[i, :len(ids)], lab_mask[i, :len(ids)] = ids, 1.0
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(200, steps // 10 + 1), steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-2))
    params = init_params(cfg, seed)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key, x, mask, lab, lmask):
        loss, grads = jax.value_and_grad(_loss)(params, _augment(key, x, cfg), mask, lab, lmask,
                                                cfg)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng, key, batches = np.random.default_rng(seed), jax.random.key(seed + 1), []
    lengths = np.array([len(f) for f in feats])
    start = time.time()
    for i in range(steps):
        if not batches:  # a new epoch
            order = np.argsort(lengths + rng.uniform(0, 20, len(feats)), kind="stable")
            size = min(cfg.batch, len(order))  # full batches only: fewer shapes to compile
            batches = [order[j:j + size] for j in range(0, len(order) - size + 1, size)]
            batches = [batches[j] for j in rng.permutation(len(batches))]
        idx = batches.pop()
        x, mask = _pad([feats[j] for j in idx], PAD_FRAMES)
        params, state, loss = step(params, state, jax.random.fold_in(key, i), x, mask,
                                   lab_all[idx], lab_mask[idx])
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"step {i} loss {float(loss):.3f} {time.time() - start:.0f}s", flush=True)
    return params


def log_mel(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """`[frames, FEATURES.dim]` what the recognizer hears: normalized log-mel frames at 50 Hz."""
    return extract(resample(np.asarray(wave, np.float32), sample_rate, FEATURES.sample_rate), FEATURES)


def _pad(feats: list[np.ndarray], multiple: int) -> tuple[np.ndarray, np.ndarray]:
    T = multiple * math.ceil(max(len(f) for f in feats) / multiple)
    x = np.zeros((len(feats), T, FEATURES.dim), np.float32)
    mask = np.zeros((len(feats), T), np.float32)
    for i, f in enumerate(feats):
        x[i, :len(f)], mask[i, :len(f)] = f, 1.0
    return x, mask


def _greedy(best_t: np.ndarray) -> str:
    """Collapse repeats, drop blanks (id 0)."""
    ids = [int(c) for j, c in enumerate(best_t) if c and (j == 0 or c != best_t[j - 1])]
    return " ".join("".join(ALPHABET[i - 1] for i in ids).split())
