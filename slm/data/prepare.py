"""From a spoken corpus to training shards: fit the tokenizers, then tokenize every split.

These are the two preparation steps the CLI runs (`slm tokenizers train`, `slm tokenize`);
both read the embedded corpus layout written by `slm corpus synth`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slm.config import TokenizersConfig
from slm.data.closed_world import normalize
from slm.data.corpus import ASSISTANT_VOICE, SPLITS, load_manifest
from slm.data.tokenize import tokenize_split
from slm.data.tokenizers import TokenizerSet, train_tokenizers
from slm.errors import DataError
from slm.speech.audio import load_audio
from slm.speech.recognizer import FEATURES


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: missing; is this a corpus written by `slm corpus synth`?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_texts(corpus_dir: Path) -> list[str]:
    """Training-side text: transcripts of train speech, the text-only lines and the written
    questions and answers."""
    texts = [u["text"] for u in load_manifest(corpus_dir / "train" / "utterances.jsonl")]
    texts += [line["text"] for line in _jsonl(corpus_dir / "text.jsonl")]
    texts += [f"{d['question']} {d['answer']}" for d in _jsonl(corpus_dir / "text_dialogues.jsonl")]
    return texts


def corpus_transcribed(corpus_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """Every train utterance at 16 kHz with its normalized transcript, to train a recognizer."""
    utterances = load_manifest(corpus_dir / "train" / "utterances.jsonl")
    return ([load_audio(corpus_dir / u["audio"], FEATURES.sample_rate) for u in utterances],
            [" ".join(normalize(u["text"])) for u in utterances])


def corpus_waves(corpus_dir: Path, count: int, seed: int,
                 voice: str | None = None) -> list[tuple[np.ndarray, int]]:
    """A seeded sample of train utterances (in one `voice`, if given) for fitting units, the
    codec and the unit vocoder; the assistant always speaks in ASSISTANT_VOICE, so that is the
    voice its unit vocoder should learn."""
    utterances = [u for u in load_manifest(corpus_dir / "train" / "utterances.jsonl")
                  if voice is None or u["voice"] == voice]
    order = np.random.default_rng(seed).permutation(len(utterances))[:count]
    return [(load_audio(corpus_dir / utterances[i]["audio"], utterances[i]["sample_rate"]),
             utterances[i]["sample_rate"]) for i in sorted(order)]


def train_corpus_tokenizers(cfg: TokenizersConfig, corpus_dir: str | Path, out_dir: str | Path,
                            seed: int = 0) -> TokenizerSet:
    corpus_dir = Path(corpus_dir)
    transcribed = corpus_transcribed(corpus_dir) if cfg.unit_features == "ctc" else None
    return train_tokenizers(cfg, corpus_texts(corpus_dir),
                            corpus_waves(corpus_dir, cfg.train_clips, seed), out_dir, seed,
                            transcribed=transcribed,
                            vocoder_waves=corpus_waves(corpus_dir, cfg.train_clips, seed,
                                                       voice=ASSISTANT_VOICE))


def tokenize_corpus(corpus_dir: str | Path, tokenizers_dir: str | Path, out_dir: str | Path,
                    max_seconds: float = 30.0, workers: int = 2, progress: bool = True,
                    features: str = "") -> dict:
    """Splits `{train,heldout}-sentences`, `{train,heldout}-dialogues`, `text` and
    `text-dialogues`.

    Dialogue records carry their question and answer utterances, so sentence splits keep only
    plain sentences and nothing is tokenized twice.
    """
    corpus_dir = Path(corpus_dir)
    jobs, utterances = [], {}
    for split in SPLITS:
        manifest = load_manifest(corpus_dir / split / "utterances.jsonl")
        utterances.update({u["id"]: u for u in manifest})
        jobs.append((f"{split}-sentences", "utterances",
                     [u for u in manifest if u["kind"] == "sentence"]))
        jobs.append((f"{split}-dialogues", "dialogues", _jsonl(corpus_dir / split / "dialogues.jsonl")))
    lines = _jsonl(corpus_dir / "text.jsonl")
    jobs.append(("text", "text", [{"id": f"text-{i:06d}", **line} for i, line in enumerate(lines)]))
    written = _jsonl(corpus_dir / "text_dialogues.jsonl")
    jobs.append(("text-dialogues", "text_dialogues",
                 [{"id": f"text-dialogue-{i:06d}", **item} for i, item in enumerate(written)]))
    return tokenize_split(jobs, utterances, corpus_dir, Path(tokenizers_dir), Path(out_dir),
                          max_seconds, workers, progress, features)


def tokenize_tfds(data_dir: str | Path, name: str, split: str, tokenizers_dir: str | Path,
                  out_dir: str | Path, out_split: str | None = None, max_seconds: float = 30.0,
                  workers: int = 2, progress: bool = True, features: str = "") -> dict:
    """Tokenize a prepared TFDS split (slm.data.tfds_builders) as plain sentences.

    Workers read examples by index themselves, so a large split is never held in memory.
    """
    from slm.data.tfds_builders import open_split

    count = len(open_split(data_dir, name, split))
    items = [{"id": f"{split}-{i}", "tfds": [str(data_dir), name, split, i]} for i in range(count)]
    jobs = [(out_split or f"{split}-sentences", "utterances", items)]
    return tokenize_split(jobs, {}, Path(data_dir), Path(tokenizers_dir), Path(out_dir),
                          max_seconds, workers, progress, features)
