"""TFDS builders: an audio folder with bad inputs, LibriSpeech from a manual dir, TF-free reading.

The audio is tiny espeak-ng speech (22050 Hz, so every WAV is also resampled); each dataset is
prepared once per module and read back through `open_split`.
"""

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from slm.data.tfds_builders import (
    audio_folder_examples, open_split, parse_ctm, parse_textgrid, prepare_audio_folder,
    prepare_librispeech,
)
from slm.errors import DataError, MissingToolError
from slm.speech.audio import load_audio


def speak(path: Path, text: str, sample_rate: int | None = None) -> Path:
    """espeak-ng speech, rewritten at `sample_rate` (any format soundfile knows by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = path.with_name(path.stem + ".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True)
    if sample_rate is None and path.suffix == ".wav":
        wav.replace(path)
    else:
        sf.write(path, load_audio(wav, sample_rate or 16000), sample_rate or 16000)
        wav.unlink()
    return path


def utterance(folder: Path, stem: str, text: str, suffix: str = ".wav") -> Path:
    speak(folder / f"{stem}{suffix}", text)
    (folder / f"{stem}.txt").write_text(text + "\n")
    return folder / f"{stem}{suffix}"


def textgrid(tiers: dict[str, list[tuple[str, float, float]]]) -> str:
    """A Praat TextGrid in the long text format."""
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0",
             "xmax = 2", "tiers? <exists>", f"size = {len(tiers)}", "item []:"]
    for number, (name, intervals) in enumerate(tiers.items(), 1):
        lines += [f"    item [{number}]:", '        class = "IntervalTier"',
                  f'        name = "{name}"', "        xmin = 0", "        xmax = 2",
                  f"        intervals: size = {len(intervals)}"]
        for index, (text, start, end) in enumerate(intervals, 1):
            lines += [f"        intervals [{index}]:", f"            xmin = {start}",
                      f"            xmax = {end}", f'            text = "{text}"']
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> tuple[Path, Path, object]:
    """train/ (two speakers; CTM, TextGrid, FLAC and OGG) and test/, prepared once."""
    root = tmp_path_factory.mktemp("good")
    utterance(root / "train" / "alice", "a", "Hello, world!")
    (root / "train" / "alice" / "a.ctm").write_text("a 1 0.10 0.30 hello\na 1 0.45 0.40 world\n")
    utterance(root / "train" / "alice", "b", "good morning")
    (root / "train" / "alice" / "b.TextGrid").write_text(textgrid({
        "phones": [("g", 0.1, 0.2)],
        "words": [("", 0.0, 0.1), ("good", 0.1, 0.4), ("morning", 0.4, 0.9), ("", 0.9, 1.2)],
    }))
    utterance(root / "train" / "bob", "c", "see you soon", ".flac")
    utterance(root / "train" / "bob", "d", "thank you", ".ogg")
    utterance(root / "test" / "carol", "e", "good night")
    data_dir = tmp_path_factory.mktemp("good_data")
    return root, data_dir, prepare_audio_folder(root, data_dir)


def by_id(source) -> dict[str, dict]:
    return {example["id"]: example for example in audio_folder_examples(source)}


def test_audio_folder_reads_back(good_folder):
    root, data_dir, builder = good_folder
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 4, "test": 1}
    assert builder.info.features["audio"].sample_rate == 16000
    assert builder.info.metadata["skipped"] == {"train": {}, "test": {}}
    train = open_split(data_dir, "slm_audio_folder", "train")
    raw = {train[i]["id"]: train[i] for i in range(len(train))}  # as TFDS decodes it
    assert raw[b"bob/c"]["speaker"] == b"bob" and raw[b"bob/c"]["audio"].dtype == np.int16
    examples = by_id(train)
    assert sorted(examples) == ["alice/a", "alice/b", "bob/c", "bob/d"]
    a = examples["alice/a"]
    assert a["text"] == "Hello, world!" and a["sample_rate"] == 16000
    assert a["wave"].dtype == np.float32 and 0 < np.abs(a["wave"]).max() <= 1
    assert a["wave"].size == load_audio(root / "train" / "alice" / "a.wav", 16000).size
    np.testing.assert_allclose([w[1:] for w in a["words"]], [[0.1, 0.4], [0.45, 0.85]], atol=1e-6)
    assert [w[0] for w in a["words"]] == a["text"].split()  # what the tokenizer checks
    assert [w[0] for w in examples["alice/b"]["words"]] == ["good", "morning"]
    assert examples["bob/c"]["words"] == [] and examples["bob/d"]["text"] == "thank you"
    assert [e["id"] for e in audio_folder_examples(open_split(data_dir, "slm_audio_folder",
                                                              "test"))] == ["carol/e"]


def test_rerun_reuses_the_prepared_dataset(good_folder, tmp_path):
    root, data_dir, builder = good_folder
    files = sorted(Path(builder.data_dir).glob("*.array_record*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = prepare_audio_folder(root, data_dir)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again.info.metadata["skipped"] == {"train": {}, "test": {}}
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="another data_dir"):
        prepare_audio_folder(tmp_path / "other", data_dir)


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    root = tmp_path / "corpus"
    speak(root / "good.wav", "hello there", sample_rate=16000)
    (root / "good.txt").write_text("hello there\n")
    resampled = utterance(root, "resampled", "one two three")  # espeak writes 22050 Hz
    truncated = utterance(root, "truncated", "cut short")
    truncated.write_bytes(truncated.read_bytes()[:30])
    (root / "notes.xyz").write_bytes(b"not audio at all")
    (root / "notes.txt").write_text("not audio at all\n")
    sf.write(root / "silent.wav", np.zeros(16000, np.float32), 16000)
    (root / "silent.txt").write_text("nothing\n")
    speak(root / "untranscribed.wav", "no words")
    utterance(root, "empty", "empty").with_suffix(".txt").write_text(" \n")
    utterance(root, "latin1", "cafe").with_suffix(".txt").write_bytes(b"caf\xe9\n")
    utterance(root, "mismatch", "good evening")
    (root / "mismatch.ctm").write_text("mismatch 1 0.1 0.3 good\nmismatch 1 0.4 0.5 morning\n")
    utterance(root, "malformed", "good evening")
    (root / "malformed.ctm").write_text("malformed 1 0.1 good\n")
    utterance(root, "long", "the quick brown fox jumps over the lazy dog and runs far away")

    builder = prepare_audio_folder(root, tmp_path / "data", max_seconds=3.0)

    assert builder.info.metadata["skipped"] == {"train": {
        "unreadable_audio": 1, "unsupported_format": 1, "silent": 1, "missing_transcript": 1,
        "empty_transcript": 1, "non_utf8_transcript": 1, "alignment_mismatch": 1,
        "bad_alignment": 1, "too_long": 1}}
    examples = by_id(open_split(tmp_path / "data", "slm_audio_folder/max_3s", "train"))
    assert sorted(examples) == ["good", "resampled"]
    assert sf.info(str(resampled)).samplerate == 22050
    assert examples["resampled"]["wave"].size == load_audio(resampled, 16000).size


def make_librispeech_subset(tree: Path, subset: str, speakers: list[int]) -> None:
    """LibriSpeech layout: <subset>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac with a
    <speaker>-<chapter>.trans.txt, and SPEAKERS.TXT / CHAPTERS.TXT at the top."""
    (tree / "SPEAKERS.TXT").parent.mkdir(parents=True, exist_ok=True)
    (tree / "SPEAKERS.TXT").write_text(
        ";ID  |SEX| SUBSET    |MINUTES| NAME\n" +
        "".join(f"{s:<5}| F | {subset} | 0.05 | Reader {s}\n" for s in speakers))
    (tree / "CHAPTERS.TXT").write_text(
        ";ID    |READER|MINUTES| SUBSET | PROJ.|BOOK ID| CH. TITLE | PROJECT TITLE\n" +
        "".join(f"{s}0 | {s} | 0.05 | {subset} | 1 | 2 | Chapter | Book\n" for s in speakers))
    for speaker in speakers:
        chapter = tree / subset / str(speaker) / f"{speaker}0"
        lines = []
        for index, text in enumerate(["HELLO WORLD", "GOOD MORNING"]):
            key = f"{speaker}-{speaker}0-{index:04d}"
            speak(chapter / f"{key}.flac", text.lower(), sample_rate=16000)
            lines.append(f"{key} {text}\n")
        (chapter / f"{speaker}-{speaker}0.trans.txt").write_text("".join(lines))


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory) -> tuple[Path, Path, object]:
    """dev-clean as an extracted tree and test-clean as an archive, in one manual dir."""
    manual = tmp_path_factory.mktemp("librispeech_manual")
    make_librispeech_subset(manual / "LibriSpeech", "dev-clean", [19, 26])
    staging = tmp_path_factory.mktemp("librispeech_archive")
    make_librispeech_subset(staging / "LibriSpeech", "test-clean", [61, 84])
    with tarfile.open(manual / "test-clean.tar.gz", "w:gz") as archive:
        archive.add(staging / "LibriSpeech", arcname="LibriSpeech")
    data_dir = tmp_path_factory.mktemp("librispeech_data")
    return manual, data_dir, prepare_librispeech(manual, data_dir)


def test_librispeech_from_tree_and_archive(librispeech):
    _, data_dir, builder = librispeech
    assert builder.info.full_name == "slm_librispeech/dev_clean+test_clean/2.1.2"
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "dev_clean": 4, "test_clean": 4}
    for split, speaker in (("dev_clean", 19), ("test_clean", 61)):
        source = open_split(data_dir, "slm_librispeech/dev_clean+test_clean", split)
        examples = by_id(source)
        assert examples[f"{speaker}-{speaker}0-0001"]["text"] == "GOOD MORNING"
        assert all(e["wave"].size > 8000 and e["words"] == [] for e in examples.values())
        assert {source[i]["speaker_id"] for i in range(len(source))} >= {speaker}
    assert builder.info.metadata["speakers"][19]["name"] == "Reader 19"


def test_missing_splits_and_datasets_are_named(librispeech, tmp_path):
    with pytest.raises(DataError, match="train_clean100"):
        prepare_librispeech(librispeech[0], tmp_path, ["train_clean100"])
    for name in ("slm_librispeech/dev_clean", "slm_audio_folder"):
        with pytest.raises(DataError, match=f"{name} is not prepared"):
            open_split(tmp_path, name, "train")


def test_reading_never_imports_tensorflow(good_folder, librispeech):
    """TF competes with JAX for threads and memory, so a reader must not pull it in."""
    script = textwrap.dedent(f"""
        import json, sys
        from slm.data.tfds_builders import audio_folder_examples, open_split
        folder = open_split({str(good_folder[1])!r}, "slm_audio_folder", "train")
        speech = open_split({str(librispeech[1])!r}, "slm_librispeech/dev_clean+test_clean",
                            "dev_clean")
        texts = [e["text"] for e in audio_folder_examples(folder)]
        texts += [e["text"] for e in audio_folder_examples(speech)]
        print(json.dumps({{"texts": texts, "tf": "tensorflow" in sys.modules}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["texts"]) == 8 and not result["tf"]


def test_preparing_without_tensorflow_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # find_spec then says: not installed
    with pytest.raises(MissingToolError, match="pip install tensorflow-cpu"):
        prepare_audio_folder(tmp_path, tmp_path / "data")


def test_alignment_parsers_are_strict():
    assert parse_ctm(";; comment\nu 1 0.5 0.25 hi 0.9\n") == [("hi", 0.5, 0.75)]
    with pytest.raises(DataError, match="utt chan start dur word"):
        parse_ctm("u 1 0.5 hi\n")
    assert parse_textgrid(textgrid({"Words": [("a", 0.0, 1.0)]})) == [("a", 0.0, 1.0)]
    with pytest.raises(DataError, match="no tier named 'words'"):
        parse_textgrid(textgrid({"phones": [("a", 0.0, 1.0)]}))
    with pytest.raises(DataError, match="not a list of xmin/xmax/text"):
        parse_textgrid(textgrid({"words": [("a", 0.0, 1.0)]}).replace("text = \"a\"", "text = a"))
    with pytest.raises(DataError, match="long text format"):
        parse_textgrid('"ooTextFile"\n"TextGrid"\n0\n1\n<exists>\n')


def test_a_split_with_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.xyz").write_bytes(b"not audio")
    with pytest.raises(DataError, match="no usable utterance in train"):
        prepare_audio_folder(tmp_path / "corpus", tmp_path / "data")


def test_tokenize_reads_a_prepared_tfds_split(good_folder, prepared, tmp_path):
    """A user's own audio folder, prepared with TFDS, tokenizes into training shards."""
    from slm.data import records
    from slm.data.prepare import tokenize_tfds

    _, data_dir, _ = good_folder
    root, _ = prepared
    summary = tokenize_tfds(data_dir, "slm_audio_folder", "train", root / "tok", tmp_path,
                            workers=1, progress=False)
    assert summary["train-sentences"]["records"] == 4
    record = records.decode(records.data_source(tmp_path, "train-sentences")[0])
    assert record["units"].size > 0 and record["codes"].shape[0] == 2 and record["text"]
