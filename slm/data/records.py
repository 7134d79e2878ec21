"""Tokenized examples on disk: ArrayRecord shards of msgpack records, plus a JSON index.

ArrayRecord gives random access (what grain needs to shuffle and to resume by index) and
msgpack keeps numpy arrays without pickle. A shard is written to a temporary name and renamed
when complete, and the index lists only complete shards, so an interrupted preparation
resumes shard by shard and a reader never sees half a shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from slm import atomic
from slm.errors import DataError

INDEX_FORMAT = "slm.records/1"


def encode(record: dict[str, Any]) -> bytes:
    return serialization.msgpack_serialize(record)


def decode(data: bytes) -> dict[str, Any]:
    return serialization.msgpack_restore(data)


def shard_path(directory: Path, split: str, shard: int) -> Path:
    return directory / f"{split}-{shard:05d}.array_record"


def write_shard(directory: Path, split: str, shard: int, records: Iterable[dict]) -> int:
    """Write one complete shard atomically; returns the number of records written."""
    path = shard_path(directory, split, shard)
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    for record in records:
        writer.write(encode(record))
        count += 1
    writer.close()
    tmp.replace(path)
    return count


def write_index(directory: Path, split: str, shards: dict[int, int], meta: dict) -> None:
    """`{split}.json`: the shard files with their record counts and how they were made."""
    index = {
        "format": INDEX_FORMAT,
        "split": split,
        "shards": [{"file": shard_path(directory, split, s).name, "records": n}
                   for s, n in sorted(shards.items())],
        "records": sum(shards.values()),
        **meta,
    }
    atomic.write_json(directory / f"{split}.json", index)


def read_index(directory: str | Path, split: str) -> dict:
    path = Path(directory) / f"{split}.json"
    if not path.is_file():
        available = sorted(p.stem for p in Path(directory).glob("*.json"))
        raise DataError(
            f"{path}: no tokenized split '{split}' (available: {available or 'none'}); "
            "run `slm tokenize` first"
        )
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: not an slm records index (format {index.get('format')!r})")
    return index


def data_source(directory: str | Path, split: str):
    """A random-access grain source over a split's shards (reads no TensorFlow)."""
    import grain

    index = read_index(directory, split)
    paths = [str(Path(directory) / shard["file"]) for shard in index["shards"]]
    if not paths:
        raise DataError(f"{directory}/{split}.json lists no shards; the split is empty")
    return grain.sources.ArrayRecordDataSource(paths)
