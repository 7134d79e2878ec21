"""The benchmark's parts: the closed world's splits, perturbations, controls, intervals, the
strict judge's snapping and the test conditions built from a corpus."""

from __future__ import annotations

import numpy as np
import pytest

from slm.data import closed_world as cw
from slm.data.corpus import HELDOUT_VOICES, TRAIN_VOICES, text_dialogues, text_lines
from slm.eval import perturb
from slm.eval.judge import snap
from slm.eval.stats import accuracy, chance, wilson
from slm.speech.audio import is_silent


# --- the closed world -----------------------------------------------------------------------

def _training_texts(n: int = 3000) -> list[str]:
    rng = np.random.default_rng(1)
    spoken = [cw.question(rng).question for _ in range(n)]
    written = [qa.question for qa in text_dialogues(0, n)] + text_lines(0, n)
    return spoken + written + [cw.sentence(rng) for _ in range(n)]


def test_text_only_facts_are_answered_with_words_the_assistant_speaks():
    spoken_answers = {f.answer for f in cw.SPOKEN_FACTS} | set(cw.NUMBERS[:10])
    assert len(cw.TEXT_ONLY_FACTS) >= 15
    assert {f.answer for f in cw.TEXT_ONLY_FACTS} <= spoken_answers


def test_held_out_phrasings_and_text_only_facts_never_reach_spoken_training():
    rng = np.random.default_rng(2)
    spoken = {cw.question(rng).question for _ in range(5000)}
    for fact in cw.TEXT_ONLY_FACTS:
        for phrasing in cw.RELATIONS[fact.relation].questions:
            assert fact.question(phrasing) not in spoken
    held_out = {cw.heldout_phrasing_question(rng).question for _ in range(2000)}
    assert not held_out & set(_training_texts())


def test_text_only_facts_are_asked_and_stated_in_text():
    written = {qa.question for qa in text_dialogues(0, 4000)}
    lines = set(text_lines(0, 4000))
    for fact in cw.TEXT_ONLY_FACTS:
        assert any(fact.question(p) in written for p in cw.RELATIONS[fact.relation].questions)
        assert set(fact.statements) & lines, fact


def test_every_word_of_a_text_only_question_is_heard_in_spoken_sentences():
    rng = np.random.default_rng(3)
    heard = {w for _ in range(5000) for w in cw.sentence(rng).split()}
    heard |= {w for _ in range(5000) for w in cw.question(rng).question.split()}
    for fact in cw.TEXT_ONLY_FACTS:
        assert set(fact.subject.split()) <= heard, fact


def test_test_set_voices_are_new_accents_and_variants():
    assert not set(HELDOUT_VOICES) & set(TRAIN_VOICES)
    accents = {v.partition("+")[0] for v in HELDOUT_VOICES}
    assert accents - {v.partition("+")[0] for v in TRAIN_VOICES}  # an accent training never used


# --- perturbations and controls ---------------------------------------------------------------

RATE = 16_000


def _speechlike(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    wave += 0.1 * np.sin(2 * np.pi * 5000 * t)
    return np.concatenate([np.zeros(1600), wave, np.zeros(1600)]).astype(np.float32)


@pytest.mark.parametrize("snr", [20.0, 10.0])
def test_noise_is_added_at_the_asked_snr(snr):
    wave = _speechlike()
    noisy = perturb.add_noise(snr)(wave, RATE, np.random.default_rng(0))
    loud = np.abs(wave) > 1e-3
    measured = 10 * np.log10(np.mean(wave[loud] ** 2) / np.mean((noisy - wave) ** 2))
    assert abs(measured - snr) < 0.3, measured


@pytest.mark.parametrize("factor", [0.85, 1.15])
def test_speed_changes_the_duration(factor):
    wave = _speechlike()
    faster = perturb.change_speed(factor)(wave, RATE, np.random.default_rng(0))
    assert abs(faster.size - wave.size / factor) <= 2


def test_low_pass_removes_the_band_above_its_cutoff():
    wave = _speechlike()
    filtered = perturb.low_pass(3000.0)(wave, RATE, np.random.default_rng(0))
    spectrum = lambda x: np.abs(np.fft.rfft(x)) ** 2  # noqa: E731
    freqs = np.fft.rfftfreq(wave.size, 1 / RATE)
    high, low = freqs > 4000, freqs < 1000
    assert spectrum(filtered)[high].sum() < 1e-4 * spectrum(wave)[high].sum()
    assert spectrum(filtered)[low].sum() == pytest.approx(spectrum(wave)[low].sum(), rel=0.01)


def test_stereo_44k_file_reads_back_as_the_same_mono_question():
    wave = _speechlike()
    back = perturb.stereo_file()(wave, RATE, np.random.default_rng(0))
    assert abs(back.size - wave.size) <= 2
    n = min(back.size, wave.size)
    # the mono mix of two microphones 0.3 ms apart comb-filters the 5 kHz tone a little
    assert np.corrcoef(back[:n], wave[:n])[0, 1] > 0.85


def test_controls_carry_no_question():
    rng = np.random.default_rng(0)
    quiet = perturb.silenced(_speechlike(), rng)
    assert not is_silent(quiet) and np.sqrt(np.mean(quiet ** 2)) < 2e-3
    for n in (2, 3, 10, 200):
        order = perturb.shuffled_order(n, rng)
        assert sorted(order) == list(range(n)) and np.all(order != np.arange(n))
    with pytest.raises(ValueError):
        perturb.shuffled_order(1, rng)


# --- intervals, chance, the strict judge -----------------------------------------------------

def test_wilson_interval_matches_known_values():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 200)[0] == pytest.approx(0.0, abs=1e-12) and wilson(0, 200)[1] < 0.02
    assert wilson(0, 0) == (0.0, 1.0)
    result = accuracy([True] * 37 + [False] * 3)
    assert result["n"] == 40 and result["accuracy"] == 0.925 and result["low"] < 0.925 < result["high"]


def test_chance_levels_of_an_answer_distribution():
    odds = chance(["four"] * 6 + ["two"] * 2 + ["six"] * 2)
    assert odds["majority"] == pytest.approx(0.6)
    assert odds["matched"] == pytest.approx(0.36 + 0.04 + 0.04)


def test_snapping_stops_at_its_distance_cap():
    assert snap("blu horze") == "blue horse"  # one edit away: snapped
    assert snap("purple") == "purple"  # far from every lexicon word: stays wrong
    assert not cw.answer_is_correct(snap("bluuuue"), cw.QA("what color is the sky", "blue", "fact"))
    assert cw.answer_is_correct(snap("the blue"), cw.QA("q", "blue", "fact")) is False  # exact word only


# --- conditions from a corpus ------------------------------------------------------------------

def test_conditions_from_a_corpus(prepared):
    from slm.eval.spoken_qa import CONDITIONS, build_conditions

    root, _ = prepared
    asked = build_conditions(root / "corpus", 3)
    assert list(asked) == list(CONDITIONS)
    voices = asked["voices"]
    assert all(q.voice in HELDOUT_VOICES for q in voices)
    assert [q.id for q in asked["silence"]] == [q.id for q in voices]
    for name in ("text", "transfer_text"):
        assert all(q.wave is None and q.voice == "" for q in asked[name])
    shuffled = asked["shuffled"]
    assert [q.answer for q in shuffled] == [q.answer for q in voices]  # scored against its own
    assert all(not np.array_equal(s.wave, q.wave) for s, q in zip(shuffled, voices))
    assert all(q.answer in {f.answer for f in cw.TEXT_ONLY_FACTS} for q in asked["transfer"])
    with pytest.raises(ValueError, match="unknown test conditions"):
        build_conditions(root / "corpus", 3, ["loud"])
