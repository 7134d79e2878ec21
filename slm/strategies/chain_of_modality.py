"""Chain of modality (SpeechGPT): one stream; the reply runs transcript -> text answer -> speech.

    <bos> [Human] <sosp> {question units} <eosp> <eoh>
    [Assistant] {question transcript} [ta] {answer text} [ua] <sosp> {answer units} <eosp> <eoa> <eos>

The model first writes down what it heard, then answers in text, and only then speaks that
answer, so the speech is conditioned on text the LM is good at. The price is latency: the
first audio unit comes after every transcript and answer token (len(transcript) +
len(answer) + 3 reply steps), which is why streaming systems (Mini-Omni, Moshi) run text and
audio in parallel, delayed streams instead. A plain text user turn skips the transcript
(`[Human] {text} <eoh> [Assistant] [ta] {answer} ...`), and a written reply stops after its
text (`... [ta] {answer} <eoa>`): a written question is answered in writing, a spoken one in
writing and then speech, as in every other strategy. Whisper/Qwen-Audio style task tags
let one model also do ASR and TTS:

    transcribe: [Human] <sosp> {units} <eosp> <eoh> [Assistant] <|transcribe|> {transcript} <eoa>
    tts:        [Human] {text} <eoh> [Assistant] <|tts|> <sosp> {units} <eosp> <eoa>

The tag belongs to the prompt (loss weight 0), so it tells the sampler which task to do; the
untagged chain is the "answer" task. `strategy.task_format` may name tasks with Qwen-Audio's
tag sequence or an instruction instead, and write transcripts with word timestamps
(slm.strategies.tasks). Segments alternate user, assistant (several turns are
allowed); user turns are weighted 0 and assistant turns 1, `<eos>` included.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from slm.config import StreamConfig
from slm.strategies.base import register_strategy, run, stream_specs
from slm.strategies.chat import chat_grid, turn_ids
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.strategies.tasks import TaskFormat, check_task
from slm.types import Grid, Segment
from slm.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class ChainOfModalityOptions:
    task: str = "answer"  # the reply's task: "answer", "transcribe" or "tts" (its tag)
    # how tasks are named: set from strategy.task_format by make_strategy
    task_format: TaskFormat = dataclasses.field(default_factory=TaskFormat, repr=False)


class ChainOfModality:
    name = "chain_of_modality"
    frame_aligned = False

    def __init__(self, task: str = "answer", task_format: TaskFormat = TaskFormat()):
        check_task(task)
        self.task, self.format = task, task_format

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        return [StreamConfig("tokens", ["specials", "text", "units"], "temporal")]

    # --- layout ---------------------------------------------------------------------

    def _reply(self, user: Segment, reply: Segment, vocab: Vocab) -> Grid:
        sp = vocab.special

        def view(segment: Segment, name: str) -> list[int]:
            return turn_ids(self.name, self.task, segment, name, vocab).tolist()

        if self.task == "transcribe":
            body = self.format.transcript(view(reply, "text"), reply.word_ends, reply.word_times,
                                          vocab)
        elif self.task == "tts":
            body = [sp("<sosp>"), *view(reply, "units"), sp("<eosp>")]
        else:
            body = view(user, "text") if user.modality == "speech" else []
            body += [sp("[ta]"), *view(reply, "text")]
            if reply.modality == "speech":
                body += [sp("[ua]"), sp("<sosp>"), *view(reply, "units"), sp("<eosp>")]
        return run(body + [sp("<eoa>")], 1.0)

    def _grid(self, segments: Sequence[Segment], vocab: Vocab, complete: bool) -> Grid:
        return chat_grid(self.name, self.task, self.format, segments, vocab, complete, run,
                         lambda user, reply: self._reply(user, reply, vocab))

    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        return self._grid(segments, vocab, complete=True)

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """Everything before the last reply: up to `[Assistant]` and the task tag, if any."""
        return self._grid(segments, vocab, complete=False)

    # --- decoding -------------------------------------------------------------------

    def policy(self, vocab: Vocab) -> DecodePolicy:
        """The chain as phases, each allowing its content and the marker that ends it."""
        (stream,) = stream_specs(self, vocab)
        text, units = list(vocab.ids("text")), list(vocab.ids("units"))
        chain = {  # (phase, content, the marker that moves on to the next phase, and markers
            #        that end the reply there: a written reply ends after its answer)
            "answer": [("transcript", text, "[ta]", ()), ("answer", text, "[ua]", ("<eoa>",)),
                       ("sosp", [], "<sosp>", ()), ("units", units, "<eosp>", ()),
                       ("eoa", [], "<eoa>", ())],
            "transcribe": [("transcript", self.format.transcript_ids(vocab), "<eoa>", ())],
            "tts": [("sosp", [], "<sosp>", ()), ("units", units, "<eosp>", ()), ("eoa", [], "<eoa>", ())],
        }[self.task]
        rule = RuleBuilder(stream).phase("done", [vocab.pad_id], final=True)
        for (phase, content, marker, ends), goto in zip(chain, [c[0] for c in chain[1:]] + ["done"]):
            end, stops = vocab.special(marker), [vocab.special(m) for m in ends]
            rule.phase(phase, content + [end, *stops]).on(phase, [end], goto).on(phase, stops, "done")
        return DecodePolicy((rule.build(start=chain[0][0], fill=vocab.pad_id),))

    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """Segments back; each reply's task is read from its tag, and a reply cut short (a
        sampled one) yields what it holds so far. Views the layout does not use are None."""
        sp = vocab.special
        human, assistant = sp("[Human]"), sp("[Assistant]")
        turns: list[tuple[str, list[int]]] = []
        for token in grid.tokens[0].tolist():
            if token in (human, assistant):
                turns.append(("user" if token == human else "assistant", []))
            elif turns:
                turns[-1][1].append(token)
        segments: list[Segment] = []
        for role, body in turns:
            task = None
            if role == "assistant":
                task, body = self.format.read(body, vocab)
            text = np.array([t for t in body if t in vocab.range("text")], np.int32)
            units = np.array([t for t in body if t in vocab.range("units")], np.int32)
            if role == "user":
                speech = sp("<sosp>") in body
                segments.append(Segment("user", "speech", units=units) if speech
                                else Segment("user", "text", text=text))
            elif task == "transcribe":
                if body:
                    segments.append(Segment("assistant", "text", text=text))
            elif task == "tts":
                if sp("<sosp>") in body:
                    segments.append(Segment("assistant", "speech", units=units))
            else:
                segments += _answer(body, segments, vocab)
        return segments


def _answer(body: list[int], segments: list[Segment], vocab: Vocab) -> list[Segment]:
    """Reads `{transcript} [ta] {answer} [ua] <sosp> {units} <eosp>`, putting the transcript on
    the user's speech segment, in place; returns the assistant segment, if the reply has one
    (a text one if the reply was cut short before `[ua]`)."""
    ta, ua, text_range = vocab.special("[ta]"), vocab.special("[ua]"), vocab.range("text")
    split = body.index(ta) if ta in body else len(body)
    transcript = np.array([t for t in body[:split] if t in text_range], np.int32)
    user = segments[-1] if segments and segments[-1].role == "user" else None
    if user and user.modality == "speech" and (split < len(body) or transcript.size):
        segments[-1] = dataclasses.replace(user, text=transcript)
    if split == len(body):
        return []
    rest = body[split + 1:]
    text = np.array([t for t in rest if t in text_range], np.int32)
    if ua not in rest:
        return [Segment("assistant", "text", text=text)]
    units = np.array([t for t in rest if t in vocab.range("units")], np.int32)
    return [Segment("assistant", "speech", text=text, units=units)]


register_strategy("chain_of_modality", lambda options, vocab: ChainOfModality(
    options.task, options.task_format), ChainOfModalityOptions)
