"""Offline tokenization: a spoken corpus -> ArrayRecord shards of token records.

A token record keeps every view of an utterance in tokenizer-local ids (text pieces, phonetic
units, codec codes) with word timings, so any strategy can lay it out later and the same
shards serve every ablation. Work is split into fixed shards processed by a pool of worker
processes; finished shards are kept, so a rerun resumes where the last one stopped. A bad
utterance is counted and logged under its reason, never fatal.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import json
import logging
import multiprocessing
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from slm.data import records
from slm.data.tokenizers import TokenizerSet, speech_frames
from slm.errors import ConfigError, DataError, SlmError
from slm.strategies.hearing import FRAMES
from slm.speech.audio import is_silent, load_audio, resample

log = logging.getLogger(__name__)
RECORDS_PER_SHARD = 128


def tokenize_utterance(utt: dict, corpus_dir: Path, tok: TokenizerSet, max_seconds: float,
                       features: str = "") -> dict:
    """Every token view of one manifest utterance; raises an SlmError for unusable input.

    `features`: also keep frames (float16) for models that hear the user as features, so
    training never recomputes them: "states" (the unit encoder's, which the units quantize) or
    "log_mel" (the inputs of an encoder the model runs itself)."""
    text = utt.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"utterance {utt.get('id')}: empty transcript")
    if "wave" in utt:  # read from a TFDS dataset rather than a file
        wave = resample(utt["wave"], utt["sample_rate"], tok.units.sample_rate)
    else:
        wave = load_audio(corpus_dir / utt["audio"], tok.units.sample_rate)
    seconds = wave.size / tok.units.sample_rate
    if seconds > max_seconds:
        raise DataError(f"utterance {utt['id']}: {seconds:.1f} s is longer than "
                        f"tokenizers.max_seconds={max_seconds}")
    if is_silent(wave):
        raise DataError(f"utterance {utt['id']}: the audio is silent")
    words = utt.get("words") or []
    if words and [w for w, _, _ in words] != text.split():
        raise DataError(f"utterance {utt['id']}: word alignment {[w for w, _, _ in words]} "
                        f"does not match the transcript {text!r}")
    units, frames = tok.units.encode_frames(wave, tok.units.sample_rate)
    if features and features != "states":
        frames = speech_frames(wave, tok.units.sample_rate, features)
    return {
        "id": utt["id"], "kind": utt.get("kind", "sentence"), "voice": utt.get("voice", ""),
        **tokenize_words(text, tok),
        "word_times": np.array([[s, e] for _, s, e in words], np.float32).reshape(-1, 2),
        "units": units.astype(np.int32),
        **({"features": frames.astype(np.float16)} if features else {}),
        "unit_rate": float(tok.units.frame_rate),
        "codes": tok.codec.encode(wave, tok.units.sample_rate).astype(np.int32),
        "code_rate": float(tok.codec.frame_rate),
        "duration": float(seconds),
    }


def tokenize_words(text: str, tok: TokenizerSet) -> dict:
    """Text pieces word by word (as a transcript and `Speaker.read` tokenize), with the piece
    index where each word ends."""
    pieces = [tok.text.encode(" " + w if i else w) for i, w in enumerate(text.split())]
    return {"text": text, "text_ids": np.array([p for word in pieces for p in word], np.int32),
            "word_token_ends": np.cumsum([len(p) for p in pieces]).astype(np.int32)}


def tokenize_text_dialogue(item: dict, tok: TokenizerSet) -> dict:
    """A written question and its written answer."""
    for key in ("question", "answer"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise DataError(f"text dialogue {item.get('id')}: empty {key!r}")
    return {"id": item["id"], "kind": "text_dialogue", "qa_kind": item.get("kind", ""),
            "question": tokenize_words(item["question"], tok),
            "answer": tokenize_words(item["answer"], tok)}


def tokenize_text(line: dict, tok: TokenizerSet) -> dict:
    text = line.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"text line {line.get('id')}: empty text")
    return {"id": line["id"], "kind": "text", "text": text,
            "text_ids": np.array(tok.text.encode(text), np.int32)}


def tokenize_dialogue(dialogue: dict, utterances: dict[str, dict], corpus_dir: Path,
                      tok: TokenizerSet, max_seconds: float, features: str = "") -> dict:
    def utt(key: str) -> dict:
        if dialogue[key] not in utterances:
            raise DataError(f"dialogue {dialogue['id']}: {key} {dialogue[key]} is not in the manifest")
        return tokenize_utterance(utterances[dialogue[key]], corpus_dir, tok, max_seconds, features)

    return {"id": dialogue["id"], "kind": "dialogue", "qa_kind": dialogue.get("kind", ""),
            "question": utt("question_id"), "answer": utt("answer_id"),
            "answer_text": dialogue.get("answer", "")}


# -- worker pool --------------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(tokenizers_dir: str, corpus_dir: str, max_seconds: float, features: str) -> None:
    _worker.update(tok=TokenizerSet.load(tokenizers_dir), corpus=Path(corpus_dir),
                   max_seconds=max_seconds, features=features)


def _run_shard(out_dir: str, split: str, shard: int, kind: str, items: list[dict],
               utterances: dict[str, dict]) -> tuple[int, int, dict[str, int], int]:
    """Tokenize one shard in a worker; returns (shard, records written, skips by reason, the
    width of the frames kept (0: none))."""
    tok, corpus, max_s, features = (_worker[k] for k in ("tok", "corpus", "max_seconds", "features"))
    skipped: collections.Counter = collections.Counter()
    good = []
    for item in items:
        try:
            item = _resolve(item)
            if kind == "utterances":
                good.append(tokenize_utterance(item, corpus, tok, max_s, features))
            elif kind == "dialogues":
                good.append(tokenize_dialogue(item, utterances, corpus, tok, max_s, features))
            elif kind == "text_dialogues":
                good.append(tokenize_text_dialogue(item, tok))
            else:
                good.append(tokenize_text(item, tok))
        except SlmError as err:
            skipped[type(err).__name__] += 1
            log.warning("skipped %s: %s", item.get("id"), err)
    count = records.write_shard(Path(out_dir), split, shard, good)
    stats = {"records": count, "skipped": dict(skipped), "features": features,
             "feature_dim": tok.frame_width(features) if features else 0}
    (Path(out_dir) / f"{split}-{shard:05d}.stats.json").write_text(json.dumps(stats))
    return shard, count, dict(skipped), stats["feature_dim"]


def _resolve(item: dict) -> dict:
    """Items naming a TFDS example (`{"tfds": [data_dir, name, split, index]}`) are read here,
    in the worker, so examples never travel between processes."""
    if "tfds" not in item:
        return item
    from slm.data.tfds_builders import example_record, open_split

    data_dir, name, split, index = item["tfds"]
    key = (data_dir, name, split)
    if key not in _worker.setdefault("tfds_sources", {}):
        _worker["tfds_sources"][key] = open_split(data_dir, name, split)
    return example_record(_worker["tfds_sources"][key][index])


def _shards(items: list[dict]) -> Iterator[tuple[int, list[dict]]]:
    for start in range(0, len(items), RECORDS_PER_SHARD):
        yield start // RECORDS_PER_SHARD, items[start:start + RECORDS_PER_SHARD]


def tokenize_split(jobs: list[tuple[str, str, list[dict]]], utterances: dict[str, dict],
                   corpus_dir: Path, tokenizers_dir: Path, out_dir: Path, max_seconds: float,
                   workers: int = 2, progress: bool = True,
                   features: str = "") -> dict[str, dict]:
    """Tokenize `(split name, kind, items)` jobs into `out_dir`; returns per-split summaries.

    Finished shards (their `.stats.json` exists) are reused, so a rerun only does what is
    left; a shard tokenized without the frames that `features` asks for is redone.
    """
    if features not in ("", *FRAMES):
        raise ConfigError(f"tokenizers.features={features!r}; choose one of {', '.join(FRAMES)}")
    feature_dims = set()
    out_dir.mkdir(parents=True, exist_ok=True)
    todo, done = [], collections.defaultdict(dict)
    skipped = collections.defaultdict(collections.Counter)
    for split, kind, items in jobs:
        for shard, chunk in _shards(items):
            stats_path = out_dir / f"{split}-{shard:05d}.stats.json"
            if stats_path.is_file() and records.shard_path(out_dir, split, shard).is_file():
                stats = json.loads(stats_path.read_text())
                kept = stats.get("features", "states" if stats.get("feature_dim") else "")
                if features and kept != features:
                    todo.append((split, shard, kind, chunk))
                    continue
                done[split][shard] = stats["records"]
                skipped[split].update(stats["skipped"])
                feature_dims.add(stats.get("feature_dim", 0))
            else:
                todo.append((split, shard, kind, chunk))
    total = sum(len(chunk) for *_, chunk in todo)
    bar = tqdm(total=total, unit="utt", desc="tokenize", disable=not progress or not total)
    context = multiprocessing.get_context("spawn")  # JAX is not fork-safe
    with futures.ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=_init_worker,
                                     initargs=(str(tokenizers_dir), str(corpus_dir), max_seconds,
                                               features)) as pool:
        pending = {pool.submit(_run_shard, str(out_dir), split, shard, kind, chunk,
                               utterances if kind == "dialogues" else {}): (split, len(chunk))
                   for split, shard, kind, chunk in todo}
        for future in futures.as_completed(pending):
            split, size = pending[future]
            shard, count, skips, dim = future.result()
            feature_dims.add(dim)
            done[split][shard] = count
            skipped[split].update(skips)
            bar.update(size)
    bar.close()
    summary = {}
    for split, shards in done.items():
        # the frames' width if every shard of this run kept them (the model's speech_input.dim)
        meta = {"skipped": dict(skipped[split]), "features": features,
                "feature_dim": min(feature_dims) if feature_dims else 0}
        records.write_index(out_dir, split, shards, meta)
        summary[split] = {"records": sum(shards.values()), **meta}
    return summary
