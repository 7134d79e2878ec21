"""A small CTC speech recognizer that judges generated speech by transcribing it.

Every strategy is scored the same way: its spoken reply (or a codec resynthesis) is transcribed
by this judge and compared with the intended text by character error rate (CER). The judge is
trained only on the corpus's train split and validated on the held-out split, whose voices it
never heard, so its own CER there bounds how much of a strategy's CER is the judge's fault.

Model: log-mel frames at 50 Hz (CMVN) -> two 1-D convolutions, the second with stride 2 ->
a few non-causal transformer layers at 25 Hz -> characters plus a CTC blank, trained with
`optax.ctc_loss` and AdamW. 25 Hz is the slowest rate CTC still fits: the fastest corpus speech
needs at most ~0.8 output frames per character (one per character, one between repeated
letters), and halving the rate roughly quarters the cost of attention and CTC on a CPU.
Parameters are a flat dict of arrays, so saving is one npz (never pickle) and one json.

Decoding is greedy CTC. The world is closed (`closed_world.LEXICON`, ~141 words), so each
hypothesis word is also snapped to the nearest lexicon word by edit distance; `transcribe` returns
the snapped text, `transcribe_raw` the raw one, and both CERs are reported.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slm import atomic
from slm.data.closed_world import LEXICON, normalize
from slm.data.corpus import load_manifest
from slm.errors import CheckpointError
from slm.speech.audio import load_audio, resample
from slm.speech.features import FeatureConfig, extract

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"  # id 0 is the CTC blank, so character i is id i + 1
FEATURES = FeatureConfig(frame_rate=50.0)
PAD_FRAMES, PAD_BATCH = 64, 16  # inference shapes are rounded up to these, bounding recompiles


@dataclass(frozen=True)
class JudgeConfig:
    d: int = 128
    layers: int = 3
    heads: int = 4
    kernel: int = 5
    batch: int = 32
    lr: float = 2e-3
    mask_frames: int = 8  # SpecAugment-style masks: widths of 2 time and 2 frequency masks,
    mask_bins: int = 10   # so the judge leans on more than one voice's fine detail


def text_key(text: str) -> str:
    """Normalized text: lower-case words without punctuation, single spaces."""
    return " ".join(normalize(text))


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def cer(hypothesis: str, reference: str) -> float:
    """Character edit distance / reference length, on normalized text (can exceed 1)."""
    hyp, ref = text_key(hypothesis), text_key(reference)
    return edit_distance(hyp, ref) / max(len(ref), 1)


def wer(hypothesis: str, reference: str) -> float:
    hyp, ref = normalize(hypothesis), normalize(reference)
    return edit_distance(hyp, ref) / max(len(ref), 1)


_LEXICON = sorted(LEXICON)  # sorted so ties always snap to the same word


def snap(text: str) -> str:
    """Each word replaced by its nearest lexicon word (the closed world is known)."""
    return " ".join(w if w in LEXICON else min(_LEXICON, key=lambda v: edit_distance(w, v))
                    for w in normalize(text))


# --- Model -----------------------------------------------------------------------------------

def init_params(cfg: JudgeConfig, seed: int) -> dict[str, jnp.ndarray]:
    shapes = {"conv1.w": (cfg.kernel, FEATURES.dim, cfg.d), "conv2.w": (cfg.kernel, cfg.d, cfg.d),
              "out.w": (cfg.d, len(ALPHABET) + 1)}
    for i in range(cfg.layers):
        shapes |= {f"l{i}.qkv": (cfg.d, 3 * cfg.d), f"l{i}.o": (cfg.d, cfg.d),
                   f"l{i}.ff1": (cfg.d, 4 * cfg.d), f"l{i}.ff2": (4 * cfg.d, cfg.d)}
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    params = {name: jax.random.normal(k, s) / math.sqrt(math.prod(s[:-1]))
              for k, (name, s) in zip(keys, shapes.items())}
    for name, s in list(shapes.items()):  # biases, and a layer-norm scale per sublayer
        params[name.replace(".w", "") + ".b"] = jnp.zeros(s[-1])
    for ln in ["out.ln"] + [f"l{i}.{j}" for i in range(cfg.layers) for j in ("ln1", "ln2")]:
        params[ln] = jnp.ones(cfg.d)
    return params


def _ln(x, scale):
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * scale


def _conv(x_btf, w, b, mask_bt, stride=1):
    x_btf = x_btf * mask_bt[..., None]  # padding must not leak into real frames
    y = jax.lax.conv_general_dilated(x_btf, w, (stride,), "SAME",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return jax.nn.gelu(y + b)


def forward(params, x_btf, mask_bt, cfg: JudgeConfig):
    """`[B, ceil(T/2), classes]` logits at 25 Hz; attention sees the whole utterance
    (non-causal) but no padding."""
    h = _conv(x_btf, params["conv1.w"], params["conv1.b"], mask_bt)
    h, mask_bt = _conv(h, params["conv2.w"], params["conv2.b"], mask_bt, 2), mask_bt[:, ::2]
    pos = jnp.arange(h.shape[1])[:, None] / 10_000 ** (jnp.arange(0, cfg.d, 2) / cfg.d)
    h = h + jnp.concatenate([jnp.sin(pos), jnp.cos(pos)], -1)
    bias_b11t = jnp.where(mask_bt[:, None, None, :] > 0, 0.0, -1e9)
    B, T, hd = h.shape[0], h.shape[1], cfg.d // cfg.heads
    for i in range(cfg.layers):
        p = lambda n: params[f"l{i}.{n}"]
        qkv = (_ln(h, p("ln1")) @ p("qkv") + p("qkv.b")).reshape(B, T, 3, cfg.heads, hd)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias_b11t, -1)
        h = h + ((att @ v).transpose(0, 2, 1, 3).reshape(B, T, cfg.d) @ p("o") + p("o.b"))
        h = h + jax.nn.gelu(_ln(h, p("ln2")) @ p("ff1") + p("ff1.b")) @ p("ff2") + p("ff2.b")
    return _ln(h, params["out.ln"]) @ params["out.w"] + params["out.b"]


def _augment(key, x_btf, cfg: JudgeConfig):
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


# --- Judge -----------------------------------------------------------------------------------

class Judge:
    """A trained recognizer: `transcribe(wave, sample_rate)` gives snapped text."""

    def __init__(self, params: dict, cfg: JudgeConfig = JudgeConfig()) -> None:
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.cfg = cfg
        self._logits = jax.jit(partial(forward, cfg=cfg))

    def transcribe_raw_batch(self, waves: list[np.ndarray], sample_rate: int) -> list[str]:
        feats = [extract(resample(np.asarray(w, np.float32), sample_rate, FEATURES.sample_rate),
                         FEATURES) for w in waves]
        out = []
        for start in range(0, len(feats), PAD_BATCH):
            chunk = feats[start:start + PAD_BATCH]
            x, mask = _pad(chunk + [chunk[0][:1]] * (PAD_BATCH - len(chunk)), PAD_FRAMES)
            best = np.asarray(self._logits(self.params, x, mask).argmax(-1))
            out += [_greedy(best[i, :(len(f) + 1) // 2]) for i, f in enumerate(chunk)]
        return out

    def transcribe_raw(self, wave: np.ndarray, sample_rate: int) -> str:
        return self.transcribe_raw_batch([wave], sample_rate)[0]

    def transcribe(self, wave: np.ndarray, sample_rate: int) -> str:
        return snap(self.transcribe_raw(wave, sample_rate))

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        atomic.write_npz(out_dir / "judge.npz", **{k: np.asarray(v) for k, v in self.params.items()})
        atomic.write_json(out_dir / "judge.json", {"config": asdict(self.cfg),
                                                   "alphabet": ALPHABET,
                                                   "features": FEATURES.to_dict()})

    @classmethod
    def load(cls, out_dir: str | Path) -> Judge:
        out_dir = Path(out_dir)
        try:
            meta = json.loads((out_dir / "judge.json").read_text("utf-8"))
            with np.load(out_dir / "judge.npz", allow_pickle=False) as arrays:
                params = dict(arrays)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{out_dir}: cannot read the judge ({err}); retrain it "
                                  f"with train_judge") from err
        if meta["alphabet"] != ALPHABET or meta["features"] != FEATURES.to_dict():
            raise CheckpointError(f"{out_dir}: the judge was saved with other features or "
                                  f"characters than this code uses; retrain it")
        return cls(params, JudgeConfig(**meta["config"]))


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


def _split(corpus_dir: str | Path, split: str, limit: int | None = None):
    """(waves, texts) of a split's utterances, in manifest order."""
    root = Path(corpus_dir)
    records = load_manifest(root / split / "utterances.jsonl")[:limit]
    waves = [load_audio(root / r["audio"], FEATURES.sample_rate) for r in records]
    return waves, [text_key(r["text"]) for r in records]


def train_judge(corpus_dir: str | Path, out_dir: str | Path | None = None, steps: int = 1000,
                seed: int = 0, cfg: JudgeConfig = JudgeConfig(), limit: int | None = None,
                log_every: int = 0) -> Judge:
    """Train on every utterance of the train split (sentences, questions and answers).

    Batches group utterances of similar length (sorted by jittered length, then shuffled) and
    are padded to a multiple of PAD_FRAMES, so the step compiles a few times and wastes little
    work on padding; the order comes from `seed` alone, so the same corpus and seed give the
    same judge."""
    waves, texts = _split(corpus_dir, "train", limit)
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
    judge = Judge(params, cfg)
    if out_dir is not None:
        judge.save(out_dir)
    return judge


def corpus_rates(hypotheses: list[str], references: list[str]) -> tuple[float, float]:
    """Corpus-level CER and WER: total edits over total reference characters / words."""
    def rate(split):
        edits = sum(edit_distance(split(text_key(h)), split(text_key(r)))
                    for h, r in zip(hypotheses, references))
        return edits / max(sum(len(split(text_key(r))) for r in references), 1)

    return rate(lambda t: t), rate(lambda t: t.split())


def judge_split(judge: Judge, corpus_dir: str | Path, split: str = "heldout",
                limit: int | None = None) -> dict:
    """Corpus-level CER/WER of the judge on a split, snapped and raw (`raw_cer`, `raw_wer`)."""
    waves, texts = _split(corpus_dir, split, limit)
    raw = judge.transcribe_raw_batch(waves, FEATURES.sample_rate)
    cer_, wer_ = corpus_rates([snap(h) for h in raw], texts)
    raw_cer, raw_wer = corpus_rates(raw, texts)
    return {"cer": cer_, "wer": wer_, "raw_cer": raw_cer, "raw_wer": raw_wer,
            "utterances": len(texts)}
