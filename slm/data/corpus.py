"""A spoken corpus of the closed world, synthesized with espeak-ng, exactly aligned.

Layout under the corpus root (paths in records are relative to it):

    corpus.json                  seed, sizes, voices, counts, failures, version
    text.jsonl                   text-only lines {"text": ...}
    text_dialogues.jsonl         written questions with their answers {"question", "answer", "kind"}
    {train,heldout}/utterances.jsonl   one record per spoken utterance, with word and
                                 phoneme timings in seconds
    {train,heldout}/dialogues.jsonl    a spoken question and the assistant's spoken answer;
                                 held-out ones name their test set ("set": voices, phrasings,
                                 transfer: see `closed_world.TEST_SETS`)
    wav/<id>.wav, wav/<id>.json  16 kHz audio and its record, written as each one is done

Held-out speakers (accents and espeak variants) never occur in training, so every held-out
set measures whether a model understands a new voice; the assistant always answers in one
voice that training contains (the model's own voice). Text-only facts are asked in
`text_dialogues.jsonl` and stated in `text.jsonl`, and never spoken. The same seed gives
byte-identical files, and a rerun only synthesizes what is missing or broken, because every utterance is planned up front from the
seed and espeak output is a pure function of its arguments (see `slm.data.espeak`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slm import atomic
from slm.config import CorpusConfig
from slm.data import closed_world
from slm.data.espeak import Timed, synthesize, text_words
from slm.errors import AudioError, DataError
from slm.speech.audio import is_silent, load_audio, resample, save_wav

log = logging.getLogger(__name__)

VERSION = 3
SAMPLE_RATE = 16_000
PAD_S = 0.1  # silence added on each side, so no word touches the edge of its clip
# Many training voices (accents x variants) so a model learns what a word sounds like rather
# than what one speaker sounds like; with 6, held-out voices were often misheard.
TRAIN_VOICES = ("en-us", "en-us+f3", "en+m3", "en+f2", "en-gb-x-rp+m1", "en-gb-x-rp+f4",
                "en-us+m1", "en-us+m5", "en-us+f4", "en-us+m8", "en+m6", "en+f5",
                "en-gb-x-rp+m7", "en-gb-x-rp+f2", "en-gb-scotland+m3", "en-gb-scotland+f3",
                "en-029+m5", "en-gb-x-gbclan+f4")
# Held out: three variants of training accents, two accents training never uses (West
# Midlands, New York City) and one other synthesizer (klatt).
HELDOUT_VOICES = ("en-us+m2", "en+f1", "en-gb-x-rp+m4", "en-gb-x-gbcwmd+m2", "en-us-nyc+f2",
                  "en-us+klatt")
ASSISTANT_VOICE = "en-us+f3"
RATES = (130, 160, 190)  # words per minute
PITCH, PITCH_JITTER = 50, 10
SPLITS = ("train", "heldout")


# How many items to make; the defaults synthesize in seconds. Configs set it under `corpus:`.
CorpusSizes = CorpusConfig


@dataclass(frozen=True)
class Utterance:
    """What to say and how: everything synthesis needs, planned before any audio exists."""

    id: str
    split: str
    kind: str  # "sentence", "question" or "answer"
    text: str
    voice: str
    rate: int
    pitch: int


@dataclass(frozen=True)
class Dialogue:
    id: str
    question: Utterance
    answer: Utterance
    kind: str  # "arithmetic" or "fact"
    test_set: str | None = None  # held-out dialogues: the closed_world.TEST_SETS it belongs to


def synthesize_corpus(out_dir: str | Path, seed: int = 0,
                      sizes: CorpusSizes | None = None) -> Path:
    """Write (or complete) the corpus under `out_dir`; returns the corpus root."""
    root, sizes = Path(out_dir), sizes or CorpusSizes()
    plan = {split: plan_split(split, seed, sizes) for split in SPLITS}
    todo = [u for sentences, dialogues in plan.values()
            for u in sentences + [x for d in dialogues for x in (d.question, d.answer)]]
    records = _speak_all(root, todo)
    counts = {split: _write_split(root, split, *plan[split], records) for split in SPLITS}
    lines = text_lines(seed, sizes.text_lines)
    atomic.write_text(root / "text.jsonl", "".join(_json_line({"text": t}) for t in lines))
    written = text_dialogues(seed, sizes.text_dialogues)
    atomic.write_text(root / "text_dialogues.jsonl", "".join(
        _json_line({"question": qa.question, "answer": qa.answer, "kind": qa.kind})
        for qa in written))
    counts |= {"text_lines": len(lines), "text_dialogues": len(written),
               "failed": len(todo) - len(records)}
    summary = {"version": VERSION, "seed": seed, "sample_rate": SAMPLE_RATE,
               "sizes": asdict(sizes), "voices": {"train": list(TRAIN_VOICES),
                                                  "heldout": list(HELDOUT_VOICES),
                                                  "assistant": ASSISTANT_VOICE},
               "counts": counts}
    atomic.write_text(root / "corpus.json", json.dumps(summary, indent=2) + "\n")
    return root


def plan_split(split: str, seed: int, sizes: CorpusSizes) -> tuple[list[Utterance],
                                                                    list[Dialogue]]:
    """The split's sentences and dialogues. Each part draws from its own generator, so
    changing one size leaves every other item as it was (and resumable). The train split's
    dialogues ask `closed_world.question`s; the held-out split has `heldout_dialogues` of
    each test set."""
    index = SPLITS.index(split)
    voices = TRAIN_VOICES if split == "train" else HELDOUT_VOICES
    n_sentences = getattr(sizes, f"{split}_sentences")
    n_dialogues = getattr(sizes, f"{split}_dialogues")
    rng = np.random.default_rng([seed, index, 0])
    sentences = [_spoken(rng, f"{split}-sentence-{i:05d}", split, "sentence",
                         closed_world.sentence(rng), voices) for i in range(n_sentences)]
    sets = {None: closed_world.question} if split == "train" else closed_world.TEST_SETS
    dialogues = []
    for number, (test_set, ask) in enumerate(sets.items()):
        rng = np.random.default_rng([seed, index, 1 + number])
        prefix = f"{split}-dialogue" if test_set is None else f"{split}-{test_set}"
        for i in range(n_dialogues):
            qa, name = ask(rng), f"{prefix}-{i:05d}"
            asked = _spoken(rng, f"{name}-question", split, "question", qa.question, voices)
            answer = Utterance(f"{name}-answer", split, "answer", qa.answer, ASSISTANT_VOICE,
                               RATES[1], PITCH)
            dialogues.append(Dialogue(name, asked, answer, qa.kind, test_set))
    return sentences, dialogues


def text_lines(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng([seed, len(SPLITS)])
    return [closed_world.text_line(rng) for _ in range(count)]


def text_dialogues(seed: int, count: int) -> list[closed_world.QA]:
    """Written questions and answers: every fact, spoken and text-only, and arithmetic."""
    rng = np.random.default_rng([seed, len(SPLITS), 1])
    return [closed_world.text_question(rng) for _ in range(count)]


def load_manifest(path: str | Path) -> list[dict]:
    """Read a JSONL manifest, checking every record: UTF-8 JSON, non-empty text, aligned
    words equal to the text's words, times ordered and inside the audio."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    records = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                _check_record(record)
            except (ValueError, TypeError, KeyError) as err:  # JSON and UTF-8 errors included
                raise DataError(f"{path}, line {number}: {err}") from err
            records.append(record)
    return records


# --- Synthesis -------------------------------------------------------------------------------

def _spoken(rng: np.random.Generator, name: str, split: str, kind: str, text: str,
            voices: tuple[str, ...]) -> Utterance:
    """`text` said by a speaker drawn from `voices`, at a drawn rate and pitch."""
    voice = voices[rng.integers(len(voices))]
    rate = RATES[rng.integers(len(RATES))]
    pitch = PITCH + int(rng.integers(-PITCH_JITTER, PITCH_JITTER + 1))
    return Utterance(name, split, kind, text, voice, rate, pitch)


def _speak_all(root: Path, todo: list[Utterance]) -> dict[str, dict]:
    """Records of all utterances that exist or could be made; failures are logged, skipped."""
    records = {}
    for utterance in tqdm(todo, desc="synthesizing", unit="utt"):
        try:
            records[utterance.id] = _existing(root, utterance) or _speak(root, utterance)
        except (DataError, AudioError) as err:
            log.warning("skipping %s: %s", utterance.id, err)
    return records


def _speak(root: Path, utterance: Utterance) -> dict:
    """Synthesize one utterance, save its padded 16 kHz audio and then its record."""
    spoken = synthesize(utterance.text, utterance.voice, utterance.rate, utterance.pitch)
    wave = resample(spoken.wave, spoken.sample_rate, SAMPLE_RATE)
    if is_silent(wave):
        raise AudioError(f"espeak-ng said nothing audible for {utterance.text!r}")
    pad = np.zeros(round(PAD_S * SAMPLE_RATE), np.float32)
    wave = np.concatenate([pad, wave, pad])
    duration = wave.size / SAMPLE_RATE
    record = asdict(utterance) | {
        "audio": f"wav/{utterance.id}.wav", "sample_rate": SAMPLE_RATE, "duration": duration,
        "words": _shifted(spoken.words, duration), "phonemes": _shifted(spoken.phonemes, duration)}
    save_wav(root / record["audio"], wave, SAMPLE_RATE)
    atomic.write_text(root / "wav" / f"{utterance.id}.json", json.dumps(record) + "\n")
    return record


def _shifted(spans: tuple[Timed, ...], duration: float) -> list[list]:
    """[label, start, end] in the padded clip, rounded to 10 µs (and kept inside it)."""
    def place(t: float) -> float:
        return min(round(t + PAD_S, 5), duration)

    return [[s.label, place(s.start), place(s.end)] for s in spans]


def _existing(root: Path, utterance: Utterance) -> dict | None:
    """The record of an earlier run, if it was made for this very utterance and its audio
    reads back whole; otherwise None, and the utterance is made again."""
    try:
        record = json.loads((root / "wav" / f"{utterance.id}.json").read_text("utf-8"))
        wave = load_audio(root / record["audio"], SAMPLE_RATE)
    except (OSError, ValueError, KeyError, TypeError, AudioError):
        return None
    same_plan = all(record.get(k) == v for k, v in asdict(utterance).items())
    whole = wave.size == round(record["duration"] * SAMPLE_RATE) and not is_silent(wave)
    return record if same_plan and whole else None


# --- Manifests -------------------------------------------------------------------------------

def _write_split(root: Path, split: str, sentences: list[Utterance],
                 dialogues: list[Dialogue], records: dict[str, dict]) -> dict[str, int]:
    """Write the split's manifests from whatever was made; a dialogue needs both halves."""
    complete = [d for d in dialogues if d.question.id in records and d.answer.id in records]
    spoken = [u for u in sentences if u.id in records]
    spoken += [u for d in complete for u in (d.question, d.answer)]
    atomic.write_text(root / split / "utterances.jsonl",
                  "".join(_json_line(records[u.id]) for u in spoken))
    atomic.write_text(root / split / "dialogues.jsonl", "".join(
        _json_line({"id": d.id, "question_id": d.question.id, "answer_id": d.answer.id,
                    "question": d.question.text, "answer": d.answer.text, "kind": d.kind}
                   | ({"set": d.test_set} if d.test_set else {}))
        for d in complete))
    return {"utterances": len(spoken), "dialogues": len(complete)}


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _check_record(record: object) -> None:
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    texts = {key: record[key] for key in ("text", "question", "answer") if key in record}
    if not texts:
        raise ValueError("the record has no text")
    for key, text in texts.items():
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{key!r} is empty")
    if "words" in record:
        _check_alignment(record)


def _check_alignment(record: dict) -> None:
    duration = float(record["duration"])
    words = [span[0] for span in record["words"]]
    if words != text_words(record["text"]):
        raise ValueError(f"the aligned words {words} are not the words of {record['text']!r}")
    _check_spans(record["words"], duration, "word", empty_ok=False)
    _check_spans(record["phonemes"], duration, "phoneme", empty_ok=True)


def _check_spans(spans: list, duration: float, what: str, empty_ok: bool) -> None:
    """Each [label, start, end] lies inside [0, duration], and starts never go back."""
    previous = 0.0
    for label, start, end in spans:
        if not (0.0 <= start <= end <= duration + 1e-6) or (end == start and not empty_ok):
            raise ValueError(f"{what} {label!r} spans [{start}, {end}], not a span of the "
                             f"{duration:.3f} s audio")
        if start < previous:
            raise ValueError(f"{what} {label!r} starts at {start}, before the one before it")
        previous = start
