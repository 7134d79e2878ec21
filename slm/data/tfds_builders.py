"""Spoken corpora as TFDS datasets: prepared once with TensorFlow, read anywhere without it.

Both builders write ArrayRecord files that `open_split` reads by random access, decoded to
numpy, so a JAX job never imports TensorFlow (it would compete for threads and memory).
`AudioFolder` turns a folder of audio + transcripts (+ word alignments) into a dataset, skipping
and counting each unusable file rather than failing; `ManualLibrispeech` is the catalog's
LibriSpeech fed from a directory holding the archives or the extracted tree, with no network.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import types
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.librispeech import librispeech_dataset_builder as librispeech

from slm.errors import AudioError, DataError, MissingToolError
from slm.speech.audio import is_silent, load_audio

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
DEFAULT_MAX_SECONDS = 30.0
SPLIT_FOLDERS = ("train", "validation", "test")
SIDECAR_SUFFIXES = {".txt", ".ctm", ".textgrid"}


class _Skip(DataError):
    """One input file is unusable; `reason` is the short name it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_ctm(text: str) -> list[tuple[str, float, float]]:
    """Kaldi CTM lines `utt chan start dur word [conf]` -> (word, start, end) in seconds."""
    words = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith(";;"):
            continue
        if len(fields) not in (5, 6):
            raise DataError(f"line {number}: expected `utt chan start dur word [conf]`")
        start, duration = float(fields[2]), float(fields[3])
        words.append((fields[4], start, start + duration))
    return words


def parse_textgrid(text: str) -> list[tuple[str, float, float]]:
    """The "words" tier of a Praat TextGrid in the long text format -> (word, start, end)."""
    if not text.startswith('File type = "ooTextFile"'):
        raise DataError("not a Praat TextGrid in the long text format")
    for tier in re.split(r"\n\s*item \[\d+\]:", text)[1:]:
        name = re.search(r'\bname = "(.*)"', tier)
        if not name or name.group(1).lower() != "words":
            continue
        size = re.search(r"intervals: size = (\d+)", tier)
        intervals = re.findall(r'intervals \[\d+\]:\s*xmin = (\S+)\s*xmax = (\S+)\s*'
                               r'text = "(.*)"\s*$', tier, re.MULTILINE)
        if not size or int(size.group(1)) != len(intervals):
            raise DataError("the 'words' tier is not a list of xmin/xmax/text intervals")
        return [(word.replace('""', '"'), float(start), float(end))
                for start, end, word in intervals]
    raise DataError("no tier named 'words'")


def _normalize(word: str) -> str:
    """Alignments and transcripts often differ only in case and punctuation."""
    return "".join(ch for ch in word.casefold() if ch.isalnum() or ch == "'").strip("'")


def _is_silence(word: str) -> bool:
    """Empty TextGrid intervals and Kaldi markers such as <eps> or <sil> are pauses, not words."""
    return not word.strip() or (word.startswith("<") and word.endswith(">"))


@dataclasses.dataclass(eq=False)
class AudioFolderConfig(tfds.core.BuilderConfig):
    max_seconds: float = DEFAULT_MAX_SECONDS


class AudioFolder(tfds.core.GeneratorBasedBuilder):
    """A folder of audio files, each with `<stem>.txt` beside it, given as the manual dir."""

    name = "slm_audio_folder"  # not a catalog name, so tfds.builder() finds this class
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [AudioFolderConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """Pass the folder as `manual_dir`: audio files (any format
    libsndfile reads) with a UTF-8 `<stem>.txt` transcript beside each, optionally `<stem>.ctm`
    or `<stem>.TextGrid` word alignments, optionally split into train/validation/test folders."""

    def _info(self) -> tfds.core.DatasetInfo:
        word = {"word": tfds.features.Text(), "start": np.float32, "end": np.float32}
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "audio": tfds.features.Audio(sample_rate=SAMPLE_RATE, dtype=np.int16),
                "text": tfds.features.Text(),
                "words": tfds.features.Sequence(word),
                "speaker": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(sample_rate=SAMPLE_RATE),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """train/validation/test subfolders are the splits if present, else all is `train`."""
        root = Path(os.fspath(dl_manager.manual_dir)).resolve()
        self.info.metadata.update(source=str(root), max_seconds=self.builder_config.max_seconds,
                                  skipped={})
        folders = {name: root / name for name in SPLIT_FOLDERS if (root / name).is_dir()}
        return {split: self._generate_examples(folder, split)
                for split, folder in (folders or {"train": root}).items()}

    def _generate_examples(self, folder: Path, split: str):
        """Yields the usable utterances; the skip counts reach the metadata when it finishes."""
        skipped: collections.Counter[str] = collections.Counter()
        candidates = _audio_candidates(folder)
        for path in candidates:
            try:
                yield path.relative_to(folder).as_posix(), self._example(path, folder)
            except _Skip as skip:
                skipped[skip.reason] += 1
                log.warning("skipping %s (%s): %s", path, skip.reason, skip)
        if skipped.total() == len(candidates):  # TFDS cannot write an empty split
            raise DataError(f"{folder}: no usable utterance in {split} (skipped {dict(skipped)})")
        self.info.metadata["skipped"][split] = dict(skipped)

    def _example(self, path: Path, folder: Path) -> dict:
        """Cheap checks first: the audio header, transcript and alignment before the samples."""
        _check_audio_header(path, self.builder_config.max_seconds)
        text = _read_transcript(path.with_suffix(".txt"))
        words = _read_alignment(path, text)
        relative = path.relative_to(folder)
        return {"id": relative.with_suffix("").as_posix(), "audio": _to_int16(_read_audio(path)),
                "text": text, "words": words, "speaker": relative.parent.name}


def _audio_candidates(folder: Path) -> list[Path]:
    """Every non-hidden file that is not a transcript or alignment: audio, or a file to report."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() not in SIDECAR_SUFFIXES)


def _read_transcript(path: Path) -> str:
    if not path.is_file():
        raise _Skip("missing_transcript", f"no transcript {path.name} beside the audio")
    try:
        text = " ".join(path.read_bytes().decode("utf-8-sig").split())
    except UnicodeDecodeError as err:
        raise _Skip("non_utf8_transcript", f"{path}: not UTF-8 ({err}); re-save it as UTF-8")
    if not text:
        raise _Skip("empty_transcript", f"{path} is empty")
    return text


def _read_alignment(audio: Path, text: str) -> list[dict]:
    """The transcript's own words with the times of the alignment beside the audio, if any."""
    parsers = {".ctm": parse_ctm, ".TextGrid": parse_textgrid}
    path = next((audio.with_suffix(s) for s in parsers if audio.with_suffix(s).is_file()), None)
    if path is None:
        return []
    try:
        aligned = [w for w in parsers[path.suffix](path.read_text("utf-8-sig"))
                   if not _is_silence(w[0])]
    except (DataError, UnicodeDecodeError, ValueError) as err:
        raise _Skip("bad_alignment", f"{path}: cannot parse ({err})")
    tokens = text.split()
    if [_normalize(w) for w, _, _ in aligned] != [_normalize(t) for t in tokens]:
        raise _Skip("alignment_mismatch", f"{path}: words {[w for w, _, _ in aligned]} do not "
                                          f"match the transcript {text!r}")
    return [{"word": t, "start": s, "end": e} for t, (_, s, e) in zip(tokens, aligned)]


def _check_audio_header(path: Path, max_seconds: float) -> None:
    """An unreadable or over-long file is refused before anything else of it is read."""
    try:
        seconds = sf.info(str(path)).duration
    except (sf.LibsndfileError, RuntimeError) as err:
        known = path.suffix[1:].upper() in sf.available_formats()
        raise _Skip("unreadable_audio" if known else "unsupported_format", f"cannot decode: {err}")
    if seconds > max_seconds:
        raise _Skip("too_long", f"{seconds:.1f} s is longer than max_seconds={max_seconds}")


def _read_audio(path: Path) -> np.ndarray:
    try:
        wave = load_audio(path, SAMPLE_RATE)
    except AudioError as err:
        raise _Skip("unreadable_audio", str(err))
    if is_silent(wave):
        raise _Skip("silent", "the audio is silent")
    return wave


def _to_int16(wave: np.ndarray) -> np.ndarray:
    return np.round(np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16)


class ManualLibrispeech(librispeech.Builder):
    """The catalog's LibriSpeech read from the manual dir instead of openslr.org.

    The config name lists the splits (`dev_clean+train_clean100`), so each choice of splits is
    its own dataset and a rerun with the same choice reuses it. Audio is decoded with soundfile
    because the catalog's path-based encoding needs pydub and ffmpeg.
    """

    name = "slm_librispeech"
    BUILDER_CONFIGS = []  # the config is made from the chosen splits
    MANUAL_DOWNLOAD_INSTRUCTIONS = """Put the openslr.org/12 archives (`dev-clean.tar.gz`, ...)
    or their extracted `LibriSpeech/` tree (with SPEAKERS.TXT and CHAPTERS.TXT) in `manual_dir`."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        sources = _librispeech_sources(Path(os.fspath(dl_manager.manual_dir)))
        subsets = {split: _subset_dir(dl_manager, sources[split])
                   for split in self.builder_config.name.split("+")}
        self._populate_metadata(d.parent.parent for d in subsets.values())
        return {split: self._generate_subset(d) for split, d in subsets.items()}

    def _generate_subset(self, subset: Path):
        """The catalog's examples of one subset, with the audio decoded to int16 samples."""
        for transcript in sorted(subset.glob("*/*/*.txt")):
            for key, example in librispeech._generate_librispeech_examples(str(transcript)):
                wave = load_audio(example["speech"], SAMPLE_RATE)
                yield key, {**example, "speech": _to_int16(wave)}


def _librispeech_sources(manual_dir: Path) -> dict[str, Path]:
    """Split name -> its extracted subset folder, or else its archive, found in `manual_dir`."""
    tree = manual_dir if manual_dir.name == "LibriSpeech" else manual_dir / "LibriSpeech"
    sources = {}
    for split, url in librispeech._DL_URLS.items():  # e.g. dev_clean: .../dev-clean.tar.gz
        archive = manual_dir / url.rsplit("/", 1)[1]
        subset = tree / archive.name.removesuffix(".tar.gz")
        sources[split] = subset if subset.is_dir() else archive
    return {split: path for split, path in sources.items() if path.exists()}


def _subset_dir(dl_manager: tfds.download.DownloadManager, source: Path) -> Path:
    """TFDS extracts an archive once into its download dir and reuses it on reruns."""
    if source.is_dir():
        return source
    extracted = Path(os.fspath(dl_manager.extract(source)))
    return extracted / "LibriSpeech" / source.name.removesuffix(".tar.gz")


def prepare_audio_folder(folder: str | Path, data_dir: str | Path,
                         max_seconds: float = DEFAULT_MAX_SECONDS) -> AudioFolder:
    """Prepares (or reuses) `slm_audio_folder` in `data_dir`; the skip counts are logged and
    kept in `builder.info.metadata["skipped"]` as {split: {reason: count}}."""
    _require_tensorflow()
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of audio and transcripts")
    config = (None if max_seconds == DEFAULT_MAX_SECONDS
              else AudioFolderConfig(name=f"max_{max_seconds:g}s", max_seconds=max_seconds))
    builder = AudioFolder(data_dir=os.fspath(data_dir), config=config)
    _prepare(builder, folder)
    if builder.info.metadata["source"] != str(folder):
        raise DataError(f"{builder.data_dir} holds a dataset prepared from "
                        f"{builder.info.metadata['source']}, not {folder}; use another data_dir")
    for split, counts in builder.info.metadata["skipped"].items():
        if counts:
            log.warning("%s: skipped %s", split, counts)
    return builder


def prepare_librispeech(manual_dir: str | Path, data_dir: str | Path,
                        splits: Sequence[str] | None = None) -> ManualLibrispeech:
    """Prepares (or reuses) the LibriSpeech `splits` (default: all found in `manual_dir`);
    read them with `open_split(data_dir, builder.info.full_name, split)`."""
    _require_tensorflow()
    manual_dir = Path(manual_dir).resolve()
    found = _librispeech_sources(manual_dir)
    missing = sorted(set(splits or found) - set(found))
    if not found or missing:
        raise DataError(f"{manual_dir}: LibriSpeech split(s) {missing or 'any'} not found "
                        f"(found {sorted(found)}); put dev-clean.tar.gz or LibriSpeech/dev-clean/ "
                        "there")
    config = librispeech.LibrispeechConfig(name="+".join(sorted(splits or found)))
    builder = ManualLibrispeech(data_dir=os.fspath(data_dir), config=config)
    _prepare(builder, manual_dir)
    return builder


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: Path) -> None:
    """ArrayRecord output, no network: the manual dir is the only source and GCS is not asked."""
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                     try_download_gcs=False),
    )


def _require_tensorflow() -> None:
    """Checked before a builder is made, since building one imports TensorFlow."""
    if importlib.util.find_spec("tensorflow") is None:
        raise MissingToolError("preparing TFDS datasets needs TensorFlow: pip install "
                               "tensorflow-cpu==2.21.0 (reading prepared data does not)")


def open_split(data_dir: str | Path, name: str, split: str) -> Sequence[dict]:
    """Random access to a prepared split, examples decoded to numpy, without TensorFlow.

    `name` is `slm_audio_folder`, `slm_audio_folder/max_20s`, `slm_librispeech/dev_clean`, ...
    """
    with _audio_feature_without_tensorflow():
        try:
            builder = tfds.builder(name, data_dir=os.fspath(data_dir))
            prepared = builder.is_prepared()
        except ValueError:  # an unknown name or config: nothing by that name was prepared there
            prepared = False
        if not prepared:
            raise DataError(f"{name} is not prepared in {data_dir}; prepare it first")
        return builder.as_data_source(split=split)


@contextlib.contextmanager
def _audio_feature_without_tensorflow() -> Iterator[None]:
    """`tfds.features.Audio` asks TensorFlow for a dtype when it is constructed, though decoding
    to numpy never uses it (tensorflow/datasets#11233); answer with the numpy dtype instead."""
    from tensorflow_datasets.core.features import audio_feature

    lazy_tf = audio_feature.tf
    audio_feature.tf = types.SimpleNamespace(dtypes=types.SimpleNamespace(as_dtype=np.dtype))
    try:
        yield
    finally:
        audio_feature.tf = lazy_tf


def audio_folder_examples(source: Sequence[dict]) -> Iterator[dict]:
    """Examples as the embedded-corpus manifest records the offline tokenizer reads, with the
    waveform in place of an audio path. LibriSpeech's `speech` is read too (without words)."""
    for index in range(len(source)):
        yield example_record(source[index])


def example_record(example: dict) -> dict:
    """One decoded TFDS example as a manifest-style record (TFDS gives text as UTF-8 bytes)."""
    audio = example["audio"] if "audio" in example else example["speech"]
    words = example.get("words", {"word": [], "start": [], "end": []})
    return {"id": example["id"].decode(), "text": example["text"].decode(),
            "words": [[w.decode(), float(s), float(e)]
                      for w, s, e in zip(words["word"], words["start"], words["end"])],
            "wave": audio.astype(np.float32) / 32768.0, "sample_rate": SAMPLE_RATE}
