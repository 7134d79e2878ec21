"""The vocabulary: layout, strings, persistence, validation and compatibility."""

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slm.errors import VocabError
from slm.vocab import SPECIAL_TOKENS, TokenRange, Vocab


def small() -> Vocab:
    return Vocab.build(text_size=10, num_units=7, num_codebooks=3, codebook_size=5)


def assert_tiles(vocab: Vocab) -> None:
    """Ranges cover [0, size) in order, with no gap or overlap."""
    assert vocab.ranges[0].start == 0
    for a, b in zip(vocab.ranges, vocab.ranges[1:]):
        assert a.stop == b.start
    assert vocab.ranges[-1].stop == vocab.size


# --- layout --------------------------------------------------------------------------

def test_build_layout_and_padding():
    v = small()
    assert [r.name for r in v.ranges] == ["specials", "text", "units", "ac0", "ac1", "ac2", "reserved"]
    assert [r.size for r in v.ranges] == [len(SPECIAL_TOKENS), 10, 7, 5, 5, 5, 96 - len(SPECIAL_TOKENS)]
    assert [r.kind for r in v.ranges] == ["special", "text", "units"] + ["acoustic"] * 3 + ["reserved"]
    assert v.size == 128 and v.num_codebooks == 3
    assert v.specials == SPECIAL_TOKENS
    assert_tiles(v)


def test_reserved_omitted_when_already_a_multiple():
    v = Vocab.build(text_size=128 - len(SPECIAL_TOKENS))
    assert [r.name for r in v.ranges] == ["specials", "text"]
    assert v.size == 128 and not v.has_range("reserved") and v.num_codebooks == 0


def test_pad_to_other_multiple_and_extra_specials():
    v = Vocab.build(text_size=5, extra_specials=["<x>"], pad_to_multiple=8)
    n = len(SPECIAL_TOKENS)
    assert v.range("specials").size == n + 1 and v.size == -(-(n + 6) // 8) * 8
    assert v.special("<x>") == n and v.from_string("<x>") == n


def test_named_ids_and_helpers():
    v = small()
    assert (v.pad_id, v.bos_id, v.eos_id) == (0, 1, 2)
    assert v.text_id(3) == 24 and v.unit_id(6) == 37 and v.codebook_id(1, 4) == 47
    assert v.local("units", 37) == 6
    np.testing.assert_array_equal(v.local("ac2", np.array([48, 52])), [0, 4])
    np.testing.assert_array_equal(v.unit_id(np.array([0, 6])), [31, 37])
    ids = v.ids("units", "specials")
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, np.r_[0:21, 31:38])
    assert 31 in v.range("units") and 38 not in v.range("units")
    assert v.range_of(41).name == "ac0"


# --- strings -------------------------------------------------------------------------

def test_every_id_round_trips_through_strings():
    v = small()
    strings = [v.to_string(i) for i in range(v.size)]
    assert len(set(strings)) == v.size
    assert [v.from_string(s) for s in strings] == list(range(v.size))
    assert v.render([1, 21, 31, 38, 53]) == "<bos> <t0> [Hu0] [Ac0_0] <reserved0>"


def test_spot_strings_in_a_bigger_vocab():
    v = Vocab.build(text_size=1000, num_units=500, num_codebooks=8, codebook_size=1024)
    assert v.to_string(v.unit_id(17)) == "[Hu17]"
    assert v.to_string(v.codebook_id(3, 511)) == "[Ac3_511]"
    assert v.from_string("[Ac3_511]") == v.codebook_id(3, 511)
    assert v.from_string("<t999>") == v.text_id(999)
    assert v.size % 128 == 0


def test_text_pieces_print_as_themselves_unless_ambiguous():
    pieces = ["a", "▁the", "<unk>", "b", "b", "[Hu1]", "ü", "x", "y", "z"]
    v = Vocab.build(text_size=10, num_units=2, text_pieces=pieces)
    strings = [v.to_string(v.text_id(i)) for i in range(10)]
    assert strings == ["a", "▁the", "<t2>", "<t3>", "<t4>", "<t5>", "ü", "x", "y", "z"]
    assert [v.from_string(v.to_string(i)) for i in range(v.size)] == list(range(v.size))
    assert v.from_string("<unk>") == v.special("<unk>")


@pytest.mark.parametrize("bad", ["hello", "[Hu7]", "[Ac3_0]", "[Ac0_5]", "<t10>", "<t01>", "<reserved76>"])
def test_from_string_rejects_unknown(bad):
    with pytest.raises(VocabError, match=re.escape(repr(bad))):
        small().from_string(bad)


# --- persistence ---------------------------------------------------------------------

def test_json_round_trip(tmp_path):
    v = Vocab.build(text_size=3, num_units=4, num_codebooks=2, codebook_size=3, text_pieces=["é", "b", "c"])
    path = tmp_path / "vocab.json"
    v.save(path)
    loaded = Vocab.load(path)
    assert loaded == v and hash(loaded) == hash(v)
    assert Vocab.from_json(json.loads(json.dumps(v.to_json()))) == v
    assert "é" in path.read_text(encoding="utf-8")
    assert v != small() and v != "not a vocab"


@pytest.mark.parametrize("content", ["{not json", '{"format": "other"}', '{"format": "slm.vocab/1"}'])
def test_load_corrupt_file_names_it(tmp_path, content):
    path = tmp_path / "broken_vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(VocabError, match="broken_vocab.json"):
        Vocab.load(path)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(VocabError, match="nowhere.json"):
        Vocab.load(tmp_path / "nowhere.json")


def test_from_json_checks_recorded_size():
    d = small().to_json()
    d["size"] = 999
    with pytest.raises(VocabError, match="999"):
        Vocab.from_json(d)


# --- validation ----------------------------------------------------------------------

N = len(SPECIAL_TOKENS)
SPECIALS = TokenRange("specials", "special", 0, N)


def test_overlapping_ranges_rejected():
    with pytest.raises(VocabError, match="'units'.*overlaps.*text"):
        Vocab([SPECIALS, TokenRange("text", "text", N, 5), TokenRange("units", "units", N + 4, 3)], SPECIAL_TOKENS)


def test_gapped_ranges_rejected():
    with pytest.raises(VocabError, match="'units'.*gap.*text"):
        Vocab([SPECIALS, TokenRange("text", "text", N, 5), TokenRange("units", "units", N + 6, 3)], SPECIAL_TOKENS)


def test_duplicate_names_rejected():
    with pytest.raises(VocabError, match="duplicate.*'text'"):
        Vocab([SPECIALS, TokenRange("text", "text", N, 5), TokenRange("text", "text", N + 5, 3)], SPECIAL_TOKENS)


def test_bad_ranges_and_strings_rejected():
    with pytest.raises(VocabError, match="kind"):
        TokenRange("units", "text", 0, 3)
    with pytest.raises(VocabError, match="size"):
        TokenRange("units", "units", 0, 0)
    with pytest.raises(VocabError, match="ac0..ac1"):
        Vocab([SPECIALS, TokenRange("ac1", "acoustic", N, 5), TokenRange("ac0", "acoustic", N + 5, 3)], SPECIAL_TOKENS)
    with pytest.raises(VocabError, match=f"{N + 1} special tokens"):
        Vocab([SPECIALS], SPECIAL_TOKENS + ("<x>",))
    with pytest.raises(VocabError, match="2 text pieces"):
        Vocab.build(text_size=3, text_pieces=["a", "b"])
    with pytest.raises(VocabError, match="duplicates"):
        Vocab.build(text_size=3, extra_specials=["<pad>"])


@pytest.mark.parametrize("call, value", [
    (lambda v: v.unit_id(7), "7"), (lambda v: v.unit_id(-1), "-1"), (lambda v: v.codebook_id(0, 5), "5"),
    (lambda v: v.codebook_id(3, 0), "3"), (lambda v: v.text_id(10), "10"), (lambda v: v.range_of(128), "128"),
    (lambda v: v.range_of(-1), "-1"), (lambda v: v.local("units", 29), "29"), (lambda v: v.special("<nope>"), "<nope>"),
])
def test_out_of_range_values_rejected(call, value):
    with pytest.raises(VocabError, match=re.escape(value)):
        call(small())


def test_missing_range_lists_known_names():
    with pytest.raises(VocabError, match="known ranges.*specials"):
        Vocab.build(text_size=3).unit_id(0)


def test_check_ids_names_where_id_and_range():
    v = small()
    v.check_ids(np.array([[31, 37], [0, 2]]), ["units", "specials"], "batch")
    with pytest.raises(VocabError, match=r"decoder targets: id 41 is '\[Ac0_3\]' in range 'ac0'.*\['units'\]"):
        v.check_ids([31, 41, 999], ["units"], "decoder targets")
    with pytest.raises(VocabError, match="id 999 is outside the vocabulary of size 128"):
        v.check_ids([31, 999], ["units"], "inputs")


# --- compatibility -------------------------------------------------------------------

def test_check_compatible():
    v = small()
    v.check_compatible(small(), "ckpt/step_100")
    other = Vocab.build(text_size=10, num_units=9, num_codebooks=3, codebook_size=5)
    with pytest.raises(VocabError, match="ckpt/step_100") as info:
        v.check_compatible(other, "ckpt/step_100")
    message = str(info.value)
    assert "'units': start=31 size=7 here vs start=31 size=9" in message
    assert "re-train/convert the checkpoint" in message


def test_check_compatible_reports_specials_and_pieces():
    v = Vocab.build(text_size=2, text_pieces=["a", "b"], extra_specials=["<x>"], pad_to_multiple=1)
    w = Vocab.build(text_size=2, text_pieces=["a", "c"], extra_specials=["<y>"], pad_to_multiple=1)
    with pytest.raises(VocabError) as info:
        v.check_compatible(w, "there.json")
    assert "specials differ at index 21: '<x>' here vs '<y>'" in str(info.value)
    assert "text pieces differ at index 1: 'b' here vs 'c'" in str(info.value)


# --- property ------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(text_size=st.integers(1, 40), num_units=st.integers(0, 40), num_codebooks=st.integers(0, 4),
       codebook_size=st.integers(1, 12), pad=st.sampled_from([1, 8, 128]))
def test_every_id_in_exactly_one_range_and_round_trips(text_size, num_units, num_codebooks, codebook_size, pad):
    v = Vocab.build(text_size=text_size, num_units=num_units, num_codebooks=num_codebooks,
                    codebook_size=codebook_size, pad_to_multiple=pad)
    assert_tiles(v)
    assert v.size % pad == 0 and v.size - pad < text_size + num_units + num_codebooks * codebook_size + len(SPECIAL_TOKENS)
    for i in range(v.size):
        owners = [r for r in v.ranges if i in r]
        assert owners == [v.range_of(i)]
        assert v.from_string(v.to_string(i)) == i


def test_check_compatible_pieces_on_one_side_only():
    with pytest.raises(VocabError, match="text pieces: 2 entries here vs none in ckpt"):
        Vocab.build(text_size=2, text_pieces=["a", "b"]).check_compatible(Vocab.build(text_size=2), "ckpt")
