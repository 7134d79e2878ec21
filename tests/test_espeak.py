"""espeak-ng synthesis: audible audio whose word and phoneme timings match the text."""

import numpy as np
import pytest

from slm.data import closed_world, espeak
from slm.data.espeak import synthesize, text_words
from slm.errors import DataError, MissingToolError
from slm.speech.audio import is_silent

PANGRAM = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def pangram():
    try:
        return synthesize(PANGRAM)
    except MissingToolError as err:
        pytest.skip(str(err))


def _cut(synthesis, start: float, end: float) -> np.ndarray:
    rate = synthesis.sample_rate
    return synthesis.wave[int(start * rate):int(end * rate)]


def test_synthesis_is_audible_mono_audio(pangram):
    assert pangram.sample_rate == 22050
    assert pangram.wave.dtype == np.float32 and pangram.wave.ndim == 1
    assert np.abs(pangram.wave).max() <= 1.0
    assert not is_silent(pangram.wave)


def test_words_are_the_texts_words_in_order_inside_the_audio(pangram):
    duration = pangram.wave.size / pangram.sample_rate
    assert [w.label for w in pangram.words] == PANGRAM.split()
    starts = [w.start for w in pangram.words]
    assert starts == sorted(set(starts))
    for word in pangram.words:
        assert 0.0 <= word.start < word.end <= duration
        assert not is_silent(_cut(pangram, word.start, word.end)), word


def test_phonemes_are_espeak_mnemonics_inside_the_audio(pangram):
    duration = pangram.wave.size / pangram.sample_rate
    labels = [p.label for p in pangram.phonemes]
    assert len(labels) > len(pangram.words) and not any(p.startswith("_") for p in labels)
    assert labels[:2] == ["D", "@2"]  # espeak's "the"
    starts = [p.start for p in pangram.phonemes]
    assert starts == sorted(starts)
    assert all(0.0 <= p.start <= p.end <= duration for p in pangram.phonemes)


def test_case_is_kept_punctuation_dropped_and_sentences_pause():
    spoken = synthesize("Hello, world. The End!")
    assert [w.label for w in spoken.words] == ["Hello", "world", "The", "End"]
    world, the = spoken.words[1], spoken.words[2]
    assert the.start - world.end > 0.05
    assert is_silent(_cut(spoken, world.end, the.start))


def test_same_arguments_give_the_same_samples_whatever_came_before(pangram):
    synthesize("something else entirely", voice="en+f2", rate=190, pitch=70)
    again = synthesize(PANGRAM)
    assert np.array_equal(again.wave, pangram.wave)
    assert again.words == pangram.words and again.phonemes == pangram.phonemes


def test_voices_and_rates_change_the_audio(pangram):
    other = synthesize(PANGRAM, voice="en+f2")
    assert other.wave.size != pangram.wave.size or not np.array_equal(other.wave, pangram.wave)
    slow, fast = synthesize(PANGRAM, rate=130), synthesize(PANGRAM, rate=190)
    assert fast.wave.size < 0.85 * slow.wave.size


@pytest.mark.parametrize("text", ["I have 42 apples", "", " ... "])
def test_text_espeak_cannot_say_word_for_word_is_refused(pangram, text):
    with pytest.raises(DataError):
        synthesize(text)


@pytest.mark.parametrize("voice", ["en+nonexistent", "xx-unknown"])
def test_unknown_voices_are_refused(pangram, voice):
    with pytest.raises(DataError, match="no voice"):
        synthesize("hello", voice=voice)


def test_available_voices_include_english(pangram):
    assert {"en", "en-us"} <= set(espeak.available_voices())


def test_text_words_split_on_whitespace_and_strip_punctuation():
    assert text_words("  Hello, world!  it's well-known ... (yes)") == [
        "Hello", "world", "it's", "well-known", "yes"]


def test_every_closed_world_word_pair_is_spoken_as_two_words(pangram):
    """espeak reads some pairs as one word ("in the"); the closed world must avoid them."""
    rng = np.random.default_rng(0)
    texts = [closed_world.sentence(rng) for _ in range(2000)]
    texts += [closed_world.text_line(rng) for _ in range(2000)]
    texts += [closed_world.question(rng).question for _ in range(2000)]
    pairs = sorted({pair for t in texts for pair in zip(t.split(), t.split()[1:])})
    for i in range(0, len(pairs), 150):
        synthesize(". ".join(f"{a} {b}" for a, b in pairs[i:i + 150]))


def test_a_missing_library_names_the_install_command(monkeypatch):
    def no_library(name):
        raise OSError(name)

    monkeypatch.setattr(espeak.ctypes, "CDLL", no_library)
    with pytest.raises(MissingToolError, match="apt-get install espeak-ng"):
        espeak._load_library()
