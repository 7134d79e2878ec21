"""Task tags: the prompt names the task its reply performs (Whisper / Qwen-Audio style).

One model learns to answer, transcribe and speak from one mixture when each prompt says which
of these its reply does. The data layer only knows what a record becomes (a dialogue, an ASR
pair, ...; see slm.data.examples); which reply task that trains, and how its prompt names it,
is decided here. A strategy that tags tasks takes the options fields `task` and `task_format`,
which `make_strategy` sets (per data task, and from `strategy.task_format`); strategies whose
layout already shows the reply's modality have neither.

The prompt of a task stands where the reply starts; three styles (`strategy.task_format.style`):

    tag          <|transcribe|>                      (slm's own; an answer is untagged)
    qwen_audio   <|startoftranscript|> <|en|> <|transcribe|> <|en|> <|notimestamps|>
                 <|startofanalysis|> <|en|> <|question-answer|> <|en|> <|notimestamps|>
    instruction  Transcribe the speech.   /   Answer the question.   (text, as Qwen2-Audio)

Qwen-Audio's tags are transcription-or-analysis, audio language, task, text language and
timestamps. The styles name the tasks of a spoken user turn; `tts` (a written user turn)
keeps `<|tts|>` and a written question stays untagged in every style. Qwen-Audio's
`translate` needs translation data, which the corpus does not have.

With `timestamps`, a transcript is SRWT (Qwen-Audio's word-level timestamps): each word between
a start and an end time token, `<|0.12|> hello <|0.40|> <|0.44|> world <|0.80|>`, times
rounded to `time_step` seconds. `timed_words` reads words and times back, e.g. to measure the
alignment shift (AAS) of predicted word boundaries. Time and Qwen-Audio tokens are specials
that only a vocabulary of such a format has (`with_task_tokens`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from slm.config import TaskFormatConfig
from slm.errors import ConfigError, DataError
from slm.text.tokenizer import TextTokenizer
from slm.vocab import Vocab

TASKS = ("answer", "transcribe", "tts")
STYLES = ("tag", "qwen_audio", "instruction")
_TRAINED_BY = {"asr": "transcribe", "tts": "tts"}  # data task -> the reply task it trains
QWEN_TAGS = ("<|startoftranscript|>", "<|startofanalysis|>", "<|question-answer|>",
             "<|timestamps|>", "<|notimestamps|>")
INSTRUCTIONS = {"answer": "Answer the question.", "transcribe": "Transcribe the speech.",
                "transcribe_timestamps": "Transcribe the speech with word times."}
_TIME = re.compile(r"<\|(\d+(?:\.\d+)?)\|>")
_LANGUAGE = re.compile(r"[a-z]{2,3}")


def reply_task(data_task: str, configured: str) -> str:
    """The reply task examples of `data_task` train: their own if they have one (an ASR pair
    trains `transcribe`), else the configured `strategy.options.task`."""
    return _TRAINED_BY.get(data_task, configured)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task={task!r}; choose one of {list(TASKS)}")


def _check(cfg: TaskFormatConfig) -> None:
    where = "strategy.task_format"
    if cfg.style not in STYLES:
        raise ConfigError(f"{where}.style={cfg.style!r}; choose one of {', '.join(STYLES)}")
    if not _LANGUAGE.fullmatch(cfg.language):
        raise ConfigError(f"{where}.language={cfg.language!r}: a language code such as 'en'")
    if not (0 < cfg.time_step <= cfg.max_time) or abs(round(cfg.time_step, 3) - cfg.time_step) > 1e-9:
        raise ConfigError(f"{where}.time_step={cfg.time_step}: a whole number of milliseconds, "
                          f"above 0 and at most max_time={cfg.max_time}")


def time_tokens(cfg: TaskFormatConfig) -> tuple[str, ...]:
    """`<|0.00|>`, `<|0.04|>`, ... up to `max_time`, spelled with the step's decimals."""
    decimals = len(f"{cfg.time_step:.3f}".rstrip("0").partition(".")[2])
    count = int(round(cfg.max_time / cfg.time_step)) + 1
    return tuple(f"<|{k * cfg.time_step:.{decimals}f}|>" for k in range(count))


def task_specials(cfg: TaskFormatConfig) -> tuple[str, ...]:
    """The specials a format needs beyond slm's own (none for the default)."""
    _check(cfg)
    tags = (*QWEN_TAGS, f"<|{cfg.language}|>") if cfg.style == "qwen_audio" else ()
    return tags + (time_tokens(cfg) if cfg.timestamps else ())


def with_task_tokens(vocab: Vocab, cfg: TaskFormatConfig) -> Vocab:
    """`vocab` with the specials `cfg` needs that it lacks; unchanged for the default format,
    so existing vocabularies and checkpoints stay as they are."""
    missing = [s for s in task_specials(cfg) if s not in vocab.specials]
    return vocab.with_specials(missing) if missing else vocab


@dataclasses.dataclass(frozen=True)
class TaskFormat:
    """A `strategy.task_format` resolved for one vocabulary: the ids of each task's prompt
    and of transcripts. `instructions`: each instruction's text ids (style "instruction")."""

    cfg: TaskFormatConfig = dataclasses.field(default_factory=TaskFormatConfig)
    instructions: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def prompt(self, task: str, user_modality: str, vocab: Vocab) -> list[int]:
        """The ids naming `task` where the reply to a `user_modality` turn starts."""
        sp = vocab.special
        if task == "tts":
            return [sp("<|tts|>")]
        if user_modality != "speech":
            return []
        style, transcribe = self.cfg.style, task == "transcribe"
        if style == "tag":
            return [sp("<|transcribe|>")] if transcribe else []
        if style == "qwen_audio":
            language = sp(f"<|{self.cfg.language}|>")
            timed = transcribe and self.cfg.timestamps
            return [sp("<|startoftranscript|>" if transcribe else "<|startofanalysis|>"), language,
                    sp("<|transcribe|>" if transcribe else "<|question-answer|>"), language,
                    sp("<|timestamps|>" if timed else "<|notimestamps|>")]
        key = "transcribe_timestamps" if transcribe and self.cfg.timestamps else task
        if key not in self.instructions:
            raise ConfigError("strategy.task_format.style=instruction writes its prompts with the "
                              "text tokenizer: build the strategy with it (make_strategy(..., "
                              "text=...); training and `slm sample` take it from tokenizers.dir)")
        return list(self.instructions[key])

    def read(self, body: Sequence[int], vocab: Vocab) -> tuple[str, list[int]]:
        """The task a reply's leading prompt names and the reply after it ("answer" when it
        names none)."""
        body = list(body)
        named = [(self.prompt(task, modality, vocab), task) for task in ("transcribe", "tts", "answer")
                 for modality in ("speech", "text")]
        for ids, task in sorted(named, key=lambda p: -len(p[0])):
            if ids and body[:len(ids)] == ids:
                return task, body[len(ids):]
        return "answer", body

    def transcript(self, text: np.ndarray, word_ends: np.ndarray | None,
                   word_times: np.ndarray | None, vocab: Vocab) -> list[int]:
        """A transcript's ids: its text, or with timestamps each word's pieces between its
        start and end time tokens (SRWT)."""
        text = [int(t) for t in np.asarray(text).ravel()]
        if not self.cfg.timestamps:
            return text
        if word_ends is None or word_times is None or len(word_ends) != len(word_times):
            raise DataError("strategy.task_format.timestamps needs each transcript word's times: "
                            "tokenize a corpus with word alignments (slm corpus synth has them; "
                            ".ctm or .TextGrid files for your own audio)")
        ids, begin = [], 0
        for end, (start_s, end_s) in zip(np.asarray(word_ends).tolist(), np.asarray(word_times)):
            ids += [self.time_id(start_s, vocab), *text[begin:end], self.time_id(end_s, vocab)]
            begin = end
        return ids

    def transcript_ids(self, vocab: Vocab) -> list[int]:
        """What a transcript may hold (the decode policy's allowed ids)."""
        times = [vocab.special(t) for t in self._times] if self.cfg.timestamps else []
        return [*vocab.ids("text").tolist(), *times]

    def time_id(self, seconds: float, vocab: Vocab) -> int:
        """The time token nearest `seconds`, clamped to [0, max_time]."""
        steps = int(round(float(seconds) / self.cfg.time_step))
        return vocab.special(self._times[min(max(steps, 0), len(self._times) - 1)])

    @functools.cached_property
    def _times(self) -> tuple[str, ...]:
        return time_tokens(self.cfg)


def task_format(cfg: TaskFormatConfig, vocab: Vocab, text: TextTokenizer | None = None) -> TaskFormat:
    """`cfg` resolved for `vocab`; instruction prompts are tokenized with `text`."""
    _check(cfg)
    instructions = {}
    if cfg.style == "instruction" and text is not None:
        instructions = {key: tuple(np.atleast_1d(vocab.text_id(np.asarray(text.encode(sentence), np.int32)))
                                   .tolist()) for key, sentence in INSTRUCTIONS.items()}
    return TaskFormat(cfg, instructions)


@dataclasses.dataclass(frozen=True)
class TimedWord:
    text: np.ndarray  # int32 text ids of the word
    start: float  # seconds
    end: float


def timed_words(ids: Sequence[int], vocab: Vocab) -> list[TimedWord]:
    """Words and times back from an SRWT transcript: the text between a start time token and
    the next time token is a word ending there. Other ids are skipped; text without a start
    time starts where it ends."""
    seconds = {vocab.special(s): float(m[1]) for s in vocab.specials if (m := _TIME.fullmatch(s))}
    text = vocab.range("text")
    words, start, pieces = [], None, []
    for token in (int(i) for i in ids):
        if token in text:
            pieces.append(token)
        elif token in seconds:
            if pieces:
                at = seconds[token]
                words.append(TimedWord(np.array(pieces, np.int32), at if start is None else start, at))
                start, pieces = None, []
            else:
                start = seconds[token]
    return words
