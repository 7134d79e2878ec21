"""Text-driven generation (LLaMA-Omni, Freeze-Omni): the LM only writes, a CTC head speaks.

    text   : <bos> [Human] <sosp> {units} <eosp> <eoh> [Assistant] a1  a2  a3  <eoa> <eos>
    units  : <pad> ...                                              -   B1  B2  B3    -
    (λ = `upsample` unit streams; block Bj: λ slots of the answer's de-duplicated units)

The LM's stream is a text chat, the same steps a text-only model takes, so the LM keeps its
structure (LLaMA-Omni freezes it and trains only the speech decoder). The answer's speech is
predicted by the `ctc_units` head kind (slm.model.unit_decoder) from the LM's final states of
the answer's text: each state is upsampled λ times and CTC scores those frames against the
answer's de-duplicated units. The unit streams are never inputs, so the LM never reads units
it did not produce.

Layout of the units: the reply's units fill the λ unit slots of the steps after each answer
token, in reading order (step by step, slot by slot), padded with `<pad>`. Block Bj sits
one step after aj because every head reads step t+1's targets from the state at t, and the
state that speaks aj is the one that has read it. A weighted block marks a speaking state.
The blocks hold N·λ slots for N text tokens, which is also what CTC needs (N·λ frames for M
units, no repeats after de-duplication): a reply with M > N·λ is a `DataError` naming the
option to raise. We chose this over a single unit stream that runs on past the text (a
reply of max(N, M) steps) because then the LM would step through M - N padded steps in
training that it never sees while decoding (the sampler stops at `<eoa>`), and pay for them.

Blocks are storage, not alignment: CTC aligns the units itself. Decoding (slm.sample) hands
each text state to the head one step after it is made and writes the units decoded so far
into the blocks in the same reading order, so a greedy overfit model reproduces the layout.

Measured on the embedded corpus (configs/ablation/tiny.yaml's tokenizers): spoken answers are
1.5 text tokens and 12.1 de-duplicated units on average, M/N up to 16 (a one-token answer
with the silence around it); tts sentences 11.1 tokens and 40.2 units, M/N up to 8. Hence
the default λ = 20: no example needs more, with room for slower voices.

Units have no durations here (LLaMA-Omni's vocoder predicts them): a read-back reply speaks
each unit for `unit_frames` frames, the mean run length of the corpus's units (2.8 frames at
50 Hz), so `Segment.units` stays one id per frame for the vocoder.

Task tags and the chat around the replies as in chain of modality (slm.strategies.chat):
`transcribe` answers a spoken turn with its transcript (no speech), `tts` writes the user's
text again and speaks it (the unit decoder's lesson on every sentence). A written question is
answered in writing; a spoken one in writing and speech. `strategy.task_format` names the
tasks and may time transcripts.

Two stages with the LM frozen (LLaMA-Omni's stage 2, Freeze-Omni): `speech_targets: false`
lays a spoken reply out as a written one (empty blocks: the unit decoder scores nothing), so a
first run teaches the LM to write; a second run from its checkpoint (`checkpoint.init_from`)
with the units back and `train.trainable: [head_kinds/ctc_units/.*]` trains the unit decoder
alone on the frozen LM's states, and the LM's text logits stay exactly the first run's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from slm.config import StreamConfig
from slm.errors import ConfigError, DataError
from slm.speech.runs import dedup_units
from slm.strategies.base import register_strategy, stream_specs
from slm.strategies.chat import chat_grid, turn_ids
from slm.strategies.policy import DecodePolicy, RuleBuilder
from slm.strategies.tasks import TaskFormat, check_task
from slm.types import Grid, Segment
from slm.vocab import Vocab

HEAD = "ctc_units"  # slm.model.unit_decoder


@dataclasses.dataclass(frozen=True)
class TextDrivenOptions:
    task: str = "answer"  # the reply's task: "answer", "transcribe" or "tts" (its tag)
    # how tasks are named: set from strategy.task_format by make_strategy
    task_format: TaskFormat = dataclasses.field(default_factory=TaskFormat, repr=False)
    upsample: int = 20  # λ: frames per text state, and unit slots per step (LLaMA-Omni: 25)
    unit_frames: int = 3  # frames each de-duplicated unit is spoken for when read back
    speech_targets: bool = True  # false: spoken replies train their text alone (stage 1 of 2)


class TextDriven:
    name = "text_driven"
    frame_aligned = False

    def __init__(self, task: str = "answer", upsample: int = 20, unit_frames: int = 3,
                 task_format: TaskFormat = TaskFormat(), speech_targets: bool = True):
        check_task(task)
        if upsample < 1 or unit_frames < 1:
            raise ConfigError(f"upsample={upsample} and unit_frames={unit_frames} must be >= 1")
        self.task, self.upsample, self.unit_frames = task, upsample, unit_frames
        self.format, self.speech_targets = task_format, speech_targets

    def streams(self, vocab: Vocab) -> list[StreamConfig]:
        units = [StreamConfig("units" if i == 0 else f"units_{i}", ["units"], HEAD)
                 for i in range(self.upsample)]
        # the user's units are inputs on the text stream, never its targets: its head spends
        # no rows on them, and the sampler does not wait for it to speak
        return [StreamConfig("text", ["specials", "text"], "temporal"), *units]

    # --- layout ---------------------------------------------------------------------

    def _steps(self, text_ids: Sequence[int], weight: float, vocab: Vocab) -> Grid:
        """Steps with `text_ids` on the text stream (weighted `weight`) and empty unit slots."""
        tokens = np.full((1 + self.upsample, len(text_ids)), vocab.pad_id, np.int32)
        tokens[0] = text_ids
        weights = np.zeros(tokens.shape, np.float32)
        weights[0] = weight
        return Grid(tokens, weights)

    def _reply(self, user: Segment, reply: Segment, vocab: Vocab) -> Grid:
        """The reply's text and `<eoa>`, its units in the blocks after each text step."""
        if self.task == "transcribe":
            transcript = self.format.transcript(turn_ids(self.name, self.task, reply, "text", vocab),
                                                reply.word_ends, reply.word_times, vocab)
            return self._steps([*transcript, vocab.special("<eoa>")], 1.0, vocab)
        text = turn_ids(self.name, self.task, user if self.task == "tts" else reply, "text", vocab)
        grid = self._steps([*text.tolist(), vocab.special("<eoa>")], 1.0, vocab)
        if reply.modality != "speech" or not self.speech_targets:
            return grid
        units = dedup_units(turn_ids(self.name, self.task, reply, "units", vocab))[0]
        n, m, lam = len(text), len(units), self.upsample
        if m > n * lam:
            raise DataError(
                f"{self.name}: a spoken reply of {n} text tokens has {m} de-duplicated units, "
                f"more than the {n} x upsample={lam} CTC frames of its text can emit; raise "
                f"strategy.options.upsample to >= {math.ceil(m / max(n, 1))}"
                + ("" if n else " (a spoken reply needs its text: the LM speaks what it writes)"))
        slots = np.full(n * lam, vocab.pad_id, np.int32)
        slots[:m] = units
        grid.tokens[1:, 1:] = slots.reshape(n, lam).T
        grid.weights[1:, 1:] = 1.0
        return grid

    def _grid(self, segments: Sequence[Segment], vocab: Vocab, complete: bool) -> Grid:
        return chat_grid(self.name, self.task, self.format, segments, vocab, complete,
                         lambda ids, weight: self._steps(ids, weight, vocab),
                         lambda user, reply: self._reply(user, reply, vocab))

    def layout(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        return self._grid(segments, vocab, complete=True)

    def prompt(self, segments: Sequence[Segment], vocab: Vocab) -> Grid:
        """Everything before the last reply: up to `[Assistant]` and the task tag, if any."""
        return self._grid(segments, vocab, complete=False)

    # --- decoding -------------------------------------------------------------------

    def policy(self, vocab: Vocab) -> DecodePolicy:
        """Text (a transcript: what the task format writes) until `<eoa>`; the unit streams
        sample nothing (the head fills them)."""
        text, *units = stream_specs(self, vocab)
        eoa, pad = vocab.special("<eoa>"), vocab.pad_id
        written = (self.format.transcript_ids(vocab) if self.task == "transcribe"
                   else vocab.ids("text").tolist())
        rules = [RuleBuilder(text).phase("answer", [*written, eoa])
                 .phase("done", [pad], final=True).on("answer", [eoa], "done")
                 .build(start="answer", fill=pad)]
        rules += [RuleBuilder(spec).phase("spoken", [], final=True).build(start="spoken", fill=pad)
                  for spec in units]
        return DecodePolicy(tuple(rules))

    def unlayout(self, grid: Grid, vocab: Vocab) -> list[Segment]:
        """Segments back; each reply's task is read from its tag, and a reply cut short (a
        sampled one) yields what it holds so far. A spoken reply's units are its blocks' unit
        ids in reading order, each repeated `unit_frames` times."""
        sp = vocab.special
        roles = {sp("[Human]"): "user", sp("[Assistant]"): "assistant"}
        text_range, unit_range = vocab.range("text"), vocab.range("units")
        turns: list[tuple[str, list[int]]] = []  # (role, its steps)
        for t, token in enumerate(grid.tokens[0].tolist()):
            if token in roles:
                turns.append((roles[token], []))
            elif turns:
                turns[-1][1].append(t)
        segments: list[Segment] = []
        for role, steps in turns:
            if role == "assistant":  # the reply after its task prompt
                steps = steps[len(steps) - len(self.format.read(grid.tokens[0, steps], vocab)[1]):]
            body = grid.tokens[0, steps]
            text = body[(body >= text_range.start) & (body < text_range.stop)].astype(np.int32)
            if role == "user":
                units = body[(body >= unit_range.start) & (body < unit_range.stop)].astype(np.int32)
                segments.append(Segment("user", "speech", units=units) if sp("<sosp>") in body
                                else Segment("user", "text", text=text))
                continue
            slots = grid.tokens[1:, steps].T.ravel()
            units = slots[(slots >= unit_range.start) & (slots < unit_range.stop)].astype(np.int32)
            if units.size:
                segments.append(Segment("assistant", "speech", text=text,
                                        units=np.repeat(units, self.unit_frames)))
            elif body.size:
                segments.append(Segment("assistant", "text", text=text))
        return segments


register_strategy("text_driven", lambda options, vocab: TextDriven(
    options.task, options.upsample, options.unit_frames, options.task_format,
    options.speech_targets), TextDrivenOptions)
