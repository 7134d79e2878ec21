"""Speech synthesis with exact word and phoneme timings, from libespeak-ng through ctypes.

espeak-ng reports, while it synthesizes, where every word and phoneme begins in the audio, so
its output comes with a perfect alignment for free. Two facts shape this module:

* espeak-ng keeps internal state from one utterance to the next (generator phases, noise)
  that neither the API, nor re-initializing, nor srand() resets: the same text spoken twice
  in one process gives different samples and timings. So synthesis runs in a small server
  process that loads the library once and forks a pristine child per utterance (about 5 ms);
  each utterance is then a pure function of its arguments, in any order and any process,
  which is what makes corpora byte-reproducible and resumable.
* espeak-ng is not thread-safe; one lock per process serializes the requests.

The voice names are espeak's ("en-us", "en" for British English, "en-gb-x-rp", ...) with an
optional variant ("en-us+f3"); `available_voices()` lists them.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import numpy as np

from slm.errors import DataError, MissingToolError

INSTALL_HINT = ("espeak-ng is not installed: run `apt-get install espeak-ng` (Debian/Ubuntu) "
                "or `brew install espeak-ng` (macOS)")
TRIM_DB = -50.0  # frames this far below the utterance's peak count as silence
TRIM_FRAME_S = 0.005


@dataclass(frozen=True)
class Timed:
    """A label and where it sounds in the audio, in seconds."""

    label: str
    start: float
    end: float


@dataclass(frozen=True)
class Synthesis:
    """Mono float32 audio in [-1, 1] with the words of the text and espeak's phonemes."""

    wave: np.ndarray
    sample_rate: int
    words: tuple[Timed, ...]
    phonemes: tuple[Timed, ...]


def synthesize(text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50) -> Synthesis:
    """Speak `text` with `voice` at `rate` words per minute and `pitch` 0..100. The words are
    exactly `text_words(text)`; text espeak would say otherwise ("42") raises DataError."""
    spans = _word_spans(text)
    if not spans:
        raise DataError(f"nothing to say: {text!r} has no words")
    server = _server()
    samples, events = server.request(("speak", text, voice, int(rate), int(pitch)))
    wave = np.frombuffer(samples, np.int16).astype(np.float32) / 32768.0
    sample_rate = server.sample_rate
    events = [_Event(*e) for e in events]
    words = _word_timings(text, spans, events, wave, sample_rate)
    return Synthesis(wave, sample_rate, words, _phoneme_timings(events, wave, sample_rate))


def available_voices() -> list[str]:
    """Language voices usable as `voice` ("en-us", "en", ...); append "+f3" etc. for a variant
    (the variant names are the files in espeak-ng-data/voices/!v)."""
    return _server().request(("voices",))


def text_words(text: str) -> list[str]:
    """The words of `text`: split on whitespace, punctuation stripped, case kept."""
    return [word for word, _, _ in _word_spans(text)]


# --- From espeak's events to timings ------------------------------------------------------

WORD_EVENT, PHONEME_EVENT = 1, 7


class _Event(NamedTuple):
    """The parts of an espeak_EVENT we use; `position` counts characters from 1."""

    type: int
    position: int
    length: int
    sample: int
    label: str


def _word_spans(text: str) -> list[tuple[str, int, int]]:
    """(word, first, last) for each word, character positions counted from 1 as espeak does."""
    spans = []
    for token in re.finditer(r"\S+", text):
        core = re.search(r"\w(.*\w)?", token.group())
        if core:
            first = token.start() + core.start() + 1
            spans.append((core.group(), first, first + len(core.group()) - 1))
    return spans


def _word_timings(text: str, spans: list[tuple[str, int, int]], events: list[_Event],
                  wave: np.ndarray, sample_rate: int) -> tuple[Timed, ...]:
    """Pair espeak's word events with the written words; a word lasts until the next word
    starts (or the speech ends), minus its trailing silence."""
    said = [e for e in events if e.type == WORD_EVENT and e.length > 0]
    # espeak may place a word one character early, on the space after a sentence's end.
    if len(said) != len(spans) or any(
            not first - 1 <= e.position <= last for e, (_, first, last) in zip(said, spans)):
        raise DataError(
            f"espeak-ng read {text!r} as {len(said)} words, not the {len(spans)} written; "
            "spell out numbers, symbols and abbreviations")
    starts = [e.sample for e in said]
    floor = _silence_floor(wave)
    words = []
    for (word, _, _), start, bound in zip(spans, starts, starts[1:] + [wave.size]):
        end = _trim_trailing_silence(wave, start, bound, floor, sample_rate)
        if end <= start:
            raise DataError(f"espeak-ng gave the word {word!r} in {text!r} no audio")
        words.append(Timed(word, start / sample_rate, end / sample_rate))
    return tuple(words)


def _phoneme_timings(events: list[_Event], wave: np.ndarray,
                     sample_rate: int) -> tuple[Timed, ...]:
    """espeak's phoneme mnemonics. Each lasts until the next phoneme or word begins; pauses
    ("_", "_:") only mark where the one before them ends. A phoneme that espeak sings inside
    its neighbour (a final "l" inside the vowel before it) keeps its place, with no duration."""
    marks = [e for e in events if e.type == PHONEME_EVENT or (e.type == WORD_EVENT and e.length)]
    bounds = [e.sample for e in marks[1:]] + [wave.size]
    floor = _silence_floor(wave)
    phonemes = []
    for event, bound in zip(marks, bounds):
        if event.type == PHONEME_EVENT and event.label and not event.label.startswith("_"):
            end = _trim_trailing_silence(wave, event.sample, bound, floor, sample_rate)
            phonemes.append(Timed(event.label, event.sample / sample_rate, end / sample_rate))
    return tuple(phonemes)


def _silence_floor(wave: np.ndarray) -> float:
    return float(np.abs(wave).max(initial=0.0)) * 10 ** (TRIM_DB / 20)


def _trim_trailing_silence(wave: np.ndarray, start: int, end: int, floor: float,
                           sample_rate: int) -> int:
    """The end of the last frame of [start, end) louder than `floor` (or `end` if none is):
    espeak's silences are digital zeros, so this finds where the sound really stops."""
    span = wave[start:end]
    frame = max(1, int(TRIM_FRAME_S * sample_rate))
    frames = np.zeros(-(-span.size // frame) * frame, np.float32)
    frames[:span.size] = span
    loud = np.flatnonzero(np.sqrt(np.mean(frames.reshape(-1, frame) ** 2, axis=1)) > floor)
    return end if loud.size == 0 else start + min(span.size, (int(loud[-1]) + 1) * frame)


# --- The library, as loaded in the server --------------------------------------------------

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS, INITIALIZE_DONT_EXIT = 0x0001, 0x8000
PARAM_RATE, PARAM_PITCH = 1, 3
POS_CHARACTER, CHARS_UTF8 = 1, 1


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p),
                ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    """espeak_EVENT from speak_lib.h (40 bytes on x86-64; checked against espeak-ng 1.51)."""

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


class _EspeakVoice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p),
                ("identifier", ctypes.c_char_p), ("gender", ctypes.c_ubyte),
                ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte),
                ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_EspeakEvent))


def _load_library() -> ctypes.CDLL:
    names = [ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1", "libespeak-ng.dylib",
             "/opt/homebrew/lib/libespeak-ng.dylib", "/usr/local/lib/libespeak-ng.dylib"]
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise MissingToolError(INSTALL_HINT)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_EspeakVoice)]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
    return lib


class _Engine:
    """libespeak-ng, initialized once; each forked child speaks one utterance with it."""

    def __init__(self):
        self.lib = _load_library()
        options = INITIALIZE_PHONEME_EVENTS | INITIALIZE_DONT_EXIT
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, options)
        if self.sample_rate <= 0:
            raise MissingToolError(f"espeak-ng cannot find its voice data. {INSTALL_HINT}")
        self._callback = _SynthCallback(self._collect)  # kept alive as long as the engine
        self.lib.espeak_SetSynthCallback(self._callback)
        self.voices = sorted(self._list_voices(None))
        self.variants = frozenset(self._list_voices(b"variant"))
        self._chunks: list[bytes] = []
        self._events: list[tuple] = []

    def speak(self, text: str, voice: str, rate: int, pitch: int) -> tuple[bytes, list[tuple]]:
        self._set_voice(voice)
        self.lib.espeak_SetParameter(PARAM_RATE, rate, 0)
        self.lib.espeak_SetParameter(PARAM_PITCH, pitch, 0)
        data = text.encode("utf-8") + b"\0"
        if self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None):
            raise DataError(f"espeak-ng refused to speak {text!r}")
        self.lib.espeak_Synchronize()
        return b"".join(self._chunks), self._events

    def _list_voices(self, kind: bytes | None) -> list[str]:
        """Voice file names; kind b"variant" lists the variants instead."""
        spec = ctypes.byref(_EspeakVoice(languages=kind)) if kind else None
        found, names = self.lib.espeak_ListVoices(spec), []
        for i in range(10_000):
            if not found[i]:
                break
            names.append(found[i].contents.identifier.decode().rsplit("/", 1)[-1].lower())
        return names

    def _set_voice(self, voice: str) -> None:
        """espeak accepts any variant name silently, so unknown variants are caught here."""
        base, _, variant = voice.partition("+")
        if variant and variant.lower() not in self.variants:
            raise DataError(f"espeak-ng has no voice variant {variant!r} (in {voice!r})")
        if self.lib.espeak_SetVoiceByName(voice.encode()):
            raise DataError(f"espeak-ng has no voice {base!r} (in {voice!r}); "
                            "`espeak-ng --voices` lists them")

    def _collect(self, wav, count, events) -> int:
        """The synth callback: keeps each chunk of 16-bit samples and the events in it."""
        if count > 0:
            self._chunks.append(ctypes.string_at(wav, count * 2))
        i = 0
        while events[i].type != 0:  # a LIST_TERMINATED event ends the array
            e = events[i]
            label = e.id.string.decode("latin-1") if e.type == PHONEME_EVENT else ""
            self._events.append((e.type, e.text_position, e.length, e.sample, label))
            i += 1
        return 0


# --- The server: one pristine fork per request ----------------------------------------------

def _serve() -> None:
    """Server main loop; replies are pickled (error class name or "ok", payload) pairs.

    Ctrl-C (or a notebook kernel's shutdown) reaches the whole process group; the server
    ignores it and ends when its client closes the pipe, so an interrupt is reported once,
    by the client, rather than also as a traceback from here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by libraries must not corrupt the reply stream
    try:
        engine = _Engine()
    except MissingToolError as err:
        return _reply(replies, ("MissingToolError", str(err)))
    _reply(replies, ("ok", engine.sample_rate))
    while True:
        try:
            request = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        child = os.fork()
        if child == 0:
            _answer_and_exit(engine, request, replies)
        if os.waitpid(child, 0)[1] != 0:
            _reply(replies, ("DataError", f"espeak-ng crashed on {request!r}"))


def _answer_and_exit(engine: _Engine, request: tuple, replies) -> NoReturn:
    """The forked child's whole life: one answer, then an exit that skips all cleanup."""
    try:
        if request[0] == "voices":
            _reply(replies, ("ok", engine.voices))
        else:
            _reply(replies, ("ok", engine.speak(*request[1:])))
    except DataError as err:
        _reply(replies, ("DataError", str(err)))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _reply(stream, reply: tuple[str, object]) -> None:
    pickle.dump(reply, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


class _Client:
    """This process's connection to its synthesis server."""

    def __init__(self):
        # The server imports this very module, even where slm is on the path by other means.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=python_path, OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1")
        command = [sys.executable, "-c", f"from {__name__} import _serve; _serve()"]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.sample_rate = self._read()
        atexit.register(self.close)

    def request(self, message: tuple):
        with self.lock:
            try:
                pickle.dump(message, self.process.stdin)
                self.process.stdin.flush()
            except BrokenPipeError:
                pass  # the server is gone; _read says why
            return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()

    def _read(self):
        try:
            status, payload = pickle.load(self.process.stdout)
        except EOFError:
            raise MissingToolError(f"the espeak-ng server stopped (exit code {self.process.wait()})"
                                   f"; see its message above. {INSTALL_HINT}") from None
        errors = {"DataError": DataError, "MissingToolError": MissingToolError}
        if status in errors:
            raise errors[status](payload)
        return payload


_client: _Client | None = None
_client_lock = threading.Lock()


def _server() -> _Client:
    """The server of this process, started on first use (and again in a forked process)."""
    global _client
    with _client_lock:
        if _client is None or _client.pid != os.getpid():
            _client = _Client()
        return _client

