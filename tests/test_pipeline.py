"""Tokenized shards -> grain batches: packing, per-host disjointness, exact resume, no TF."""

import subprocess
import sys

import numpy as np
import pytest

from slm.data import records
from slm.data.pipeline import GrainTokenSource
from slm.errors import DataError
from tests.conftest import REPO

SEQ_LEN, BATCH = 16, 4


def _write_split(directory, n=40, seed=0):
    rng = np.random.default_rng(seed)
    # every token of example i is i + 1, so a batch tells which examples it holds
    examples = [{"id": f"u{i}", "units": np.full(rng.integers(3, 12), i + 1, np.int32)}
                for i in range(n)]
    half = n // 2
    records.write_shard(directory, "train", 0, examples[:half])
    records.write_shard(directory, "train", 1, examples[half:])
    records.write_index(directory, "train", {0: half, 1: n - half}, {"skipped": {}})
    return examples


def units_layout(record, rng):
    """Test layout: two streams, the units and the units shifted by 100, all weighted."""
    units = record["units"]
    tokens = np.stack([units, units + 100])
    return {"tokens": tokens, "weights": np.ones(tokens.shape, np.float32)}


def _source(directory, **kwargs):
    args = dict(seed=0, seq_len=SEQ_LEN, batch_size=BATCH) | kwargs
    return GrainTokenSource(directory, [("train", units_layout, 1.0)], **args)


def test_records_round_trip(tmp_path):
    examples = _write_split(tmp_path)
    source = records.data_source(tmp_path, "train")
    assert len(source) == len(examples)
    got = records.decode(source[3])
    assert got["id"] == "u3" and np.array_equal(got["units"], examples[3]["units"])


def test_missing_split_names_the_fix(tmp_path):
    _write_split(tmp_path)
    with pytest.raises(DataError, match="slm tokenize"):
        records.data_source(tmp_path, "heldout")


def test_batches_are_packed_fixed_shape_grids(tmp_path):
    examples = _write_split(tmp_path)
    lengths = {len(e["units"]) for e in examples}
    batch = next(_source(tmp_path))
    assert batch["tokens"].shape == (BATCH, 2, SEQ_LEN) and batch["tokens"].dtype == np.int32
    assert batch["weights"].shape == (BATCH, 2, SEQ_LEN)
    filled = batch["weights"][:, 0] > 0
    # packing: rows hold more real tokens than any single example, padding has weight 0 and id 0
    assert filled.sum(axis=1).max() > max(lengths)
    assert np.all(batch["tokens"][:, 0][~filled] == 0)
    np.testing.assert_array_equal(batch["tokens"][:, 1][filled], batch["tokens"][:, 0][filled] + 100)
    # segment ids: one per example along a row (every token of example i is i + 1), 0 on padding
    segments = batch["segments"][:, 0]
    assert batch["segments"].shape == (BATCH, 1, SEQ_LEN) and np.all((segments > 0) == filled)
    for row_tokens, row_segments in zip(batch["tokens"][:, 0], segments):
        for segment in set(row_segments[row_segments > 0].tolist()):
            assert len(set(row_tokens[row_segments == segment].tolist())) == 1


def test_resume_from_state_gives_identical_batches(tmp_path):
    _write_split(tmp_path)
    source = _source(tmp_path)
    for _ in range(7):
        next(source)
    state = source.get_state()
    expected = [next(source) for _ in range(5)]
    resumed = _source(tmp_path)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["weights"], want["weights"])


def test_hosts_read_disjoint_examples(tmp_path):
    _write_split(tmp_path)

    def seen(process_index):
        source = _source(tmp_path, process_index=process_index, process_count=2)
        tokens = np.concatenate([next(source)["tokens"][:, 0].ravel() for _ in range(10)])
        return set(tokens[tokens > 0].tolist())

    host0, host1 = seen(0), seen(1)
    assert host0 and host1 and not (host0 & host1)
    assert host0 | host1 == set(range(1, 41))  # together the hosts cover the data


def test_mixture_draws_from_every_part_by_weight(tmp_path):
    _write_split(tmp_path)

    def shifted(record, rng):
        grid = units_layout(record, rng)
        return {"tokens": grid["tokens"] + 1000, "weights": grid["weights"]}

    source = GrainTokenSource(tmp_path, [("train", units_layout, 3.0), ("train", shifted, 1.0)],
                              seed=0, seq_len=SEQ_LEN, batch_size=BATCH)
    tokens = np.concatenate([next(source)["tokens"][:, 0].ravel() for _ in range(30)])
    plain, marked = np.sum((tokens > 0) & (tokens < 1000)), np.sum(tokens >= 1000)
    assert marked > 0 and 2 < plain / marked < 4.5


def test_reading_does_not_import_tensorflow(tmp_path):
    _write_split(tmp_path)
    code = (
        "import sys\n"
        "from tests.test_pipeline import _source\n"
        f"s = _source({str(tmp_path)!r})\n"
        "[next(s) for _ in range(3)]\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
