"""The closed world's generators and the spoken corpus built from them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from slm.data import closed_world, corpus
from slm.data.closed_world import LEXICON, NUMBERS, QA, answer_is_correct
from slm.data.corpus import CorpusSizes, load_manifest, synthesize_corpus
from slm.data.espeak import synthesize
from slm.errors import DataError, MissingToolError

TINY = CorpusSizes(train_sentences=4, train_dialogues=3, heldout_sentences=2,
                   heldout_dialogues=2, text_lines=10)
MANIFESTS = ["train/utterances.jsonl", "train/dialogues.jsonl", "heldout/utterances.jsonl",
             "heldout/dialogues.jsonl", "text.jsonl"]


def _draw(seed: int) -> list:
    rng = np.random.default_rng(seed)
    return ([closed_world.question(rng) for _ in range(50)]
            + [closed_world.sentence(rng) for _ in range(50)]
            + [closed_world.text_line(rng) for _ in range(50)])


def test_generators_are_pure_functions_of_the_seed():
    assert _draw(1) == _draw(1)
    assert _draw(1) != _draw(2)


def test_arithmetic_answers_are_right():
    rng = np.random.default_rng(0)
    for _ in range(300):
        qa = closed_world.arithmetic_question(rng)
        a, op, b = qa.question.split()[-3:]
        result = closed_world.OPERATIONS[op](NUMBERS.index(a), NUMBERS.index(b))
        assert qa.kind == "arithmetic" and NUMBERS[result] == qa.answer


def test_everything_is_lower_case_words_from_the_lexicon():
    rng = np.random.default_rng(0)
    texts = [closed_world.sentence(rng) for _ in range(500)]
    texts += [closed_world.text_line(rng) for _ in range(500)]
    texts += [t for qa in (closed_world.question(rng) for _ in range(500))
              for t in (qa.question, qa.answer)]
    for text in texts:
        assert set(text.split()) <= LEXICON, text
    assert all(4 <= len(closed_world.sentence(rng).split()) <= 10 for _ in range(500))
    assert len({closed_world.sentence(rng) for _ in range(2000)}) > 300
    assert all(len(fact.answer.split()) == 1 for fact in closed_world.FACTS)


def test_answer_is_correct_compares_normalized_words():
    qa = QA("what is three plus four", "seven", "arithmetic")
    assert answer_is_correct("seven", qa)
    assert answer_is_correct("  Seven.\n", qa)
    assert not answer_is_correct("eight", qa)
    assert not answer_is_correct("seven days", qa)
    assert not answer_is_correct("", qa)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    try:
        return synthesize_corpus(tmp_path_factory.mktemp("corpus"), seed=3, sizes=TINY)
    except MissingToolError as err:
        pytest.skip(str(err))


def test_corpus_files_exist_and_manifests_validate(built):
    summary = json.loads((built / "corpus.json").read_text())
    sets = len(closed_world.TEST_SETS)  # held-out dialogues are per test set
    assert summary["counts"] == {"train": {"utterances": 10, "dialogues": 3},
                                 "heldout": {"utterances": 2 + 2 * 2 * sets, "dialogues": 2 * sets},
                                 "text_lines": 10, "text_dialogues": TINY.text_dialogues,
                                 "failed": 0}
    held_out = load_manifest(built / "heldout" / "dialogues.jsonl")
    assert [d["set"] for d in held_out] == [s for s in closed_world.TEST_SETS for _ in range(2)]
    assert len(load_manifest(built / "text_dialogues.jsonl")) == TINY.text_dialogues
    for split in ("train", "heldout"):
        for record in load_manifest(built / split / "utterances.jsonl"):
            info = sf.info(built / record["audio"])
            assert (info.samplerate, info.channels) == (16000, 1)
            assert info.frames == round(record["duration"] * 16000)
            assert record["words"][0][1] >= corpus.PAD_S - 1e-9
    assert len(load_manifest(built / "text.jsonl")) == 10


def test_heldout_voices_never_speak_in_training(built):
    train = load_manifest(built / "train" / "utterances.jsonl")
    heldout = load_manifest(built / "heldout" / "utterances.jsonl")
    assert not {r["voice"] for r in train} & set(corpus.HELDOUT_VOICES)
    assert {r["voice"] for r in heldout if r["kind"] != "answer"} <= set(corpus.HELDOUT_VOICES)
    assert {r["voice"] for r in heldout if r["kind"] == "answer"} == {corpus.ASSISTANT_VOICE}
    assert corpus.ASSISTANT_VOICE in corpus.TRAIN_VOICES


def test_dialogues_pair_questions_with_correct_answers(built):
    utterances = {r["id"]: r for r in load_manifest(built / "train" / "utterances.jsonl")}
    for dialogue in load_manifest(built / "train" / "dialogues.jsonl"):
        question, answer = utterances[dialogue["question_id"]], utterances[dialogue["answer_id"]]
        assert (question["kind"], answer["kind"]) == ("question", "answer")
        qa = QA(question["text"], dialogue["answer"], dialogue["kind"])
        assert answer_is_correct(answer["text"], qa)


def test_same_seed_gives_byte_identical_files(built, tmp_path):
    again = synthesize_corpus(tmp_path, seed=3, sizes=TINY)
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (built / name).read_bytes() == (again / name).read_bytes(), name


def test_a_rerun_only_remakes_what_is_missing(built, tmp_path, monkeypatch):
    copy = Path(shutil.copytree(built, tmp_path / "copy"))
    (copy / "wav" / "train-sentence-00001.wav").unlink()
    spoken = []

    def counting(text, *args):
        spoken.append(text)
        return synthesize(text, *args)

    monkeypatch.setattr(corpus, "synthesize", counting)
    synthesize_corpus(copy, seed=3, sizes=TINY)
    assert len(spoken) == 1
    for name in MANIFESTS + ["wav/train-sentence-00001.wav"]:
        assert (copy / name).read_bytes() == (built / name).read_bytes(), name


def test_a_failed_utterance_is_counted_and_its_dialogue_dropped(built, tmp_path, monkeypatch):
    copy = Path(shutil.copytree(built, tmp_path / "copy"))
    for suffix in (".wav", ".json"):
        (copy / "wav" / f"train-dialogue-00001-question{suffix}").unlink()

    def broken(text, *args):
        raise DataError("espeak-ng crashed")

    monkeypatch.setattr(corpus, "synthesize", broken)
    synthesize_corpus(copy, seed=3, sizes=TINY)
    counts = json.loads((copy / "corpus.json").read_text())["counts"]
    assert counts["failed"] == 1 and counts["train"]["dialogues"] == 2
    ids = [d["id"] for d in load_manifest(copy / "train" / "dialogues.jsonl")]
    assert ids == ["train-dialogue-00000", "train-dialogue-00002"]


def _corrupt(built: Path, tmp_path: Path, edit) -> Path:
    """A copy of the train manifest whose second record is changed by `edit`."""
    lines = (built / "train" / "utterances.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = edit(lines[1])
    path = tmp_path / "utterances.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def _edit_record(change):
    def edit(line: bytes) -> bytes:
        record = json.loads(line)
        change(record)
        return json.dumps(record).encode() + b"\n"

    return edit


@pytest.mark.parametrize("edit, reason", [
    (lambda line: line[:40] + b"\n", "Unterminated|Expecting"),
    (lambda line: b"\xff\xfe" + line, "utf-8"),
    (_edit_record(lambda r: r.update(text=" ")), "empty"),
    (_edit_record(lambda r: r.update(text=r["text"] + " extra")), "not the words"),
    (_edit_record(lambda r: r["words"][0].__setitem__(2, r["duration"] + 1)), "not a span"),
    (_edit_record(lambda r: r["phonemes"].reverse()), "before the one before"),
])
def test_a_bad_manifest_line_names_file_and_line(built, tmp_path, edit, reason):
    path = _corrupt(built, tmp_path, edit)
    with pytest.raises(DataError, match=reason) as caught:
        load_manifest(path)
    assert f"{path}, line 2" in str(caught.value)
