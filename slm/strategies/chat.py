"""Chats of alternating user and assistant turns whose replies perform a tagged task.

Chain of modality and text-driven generation lay a dialogue out the same way around their
replies: `<bos>`, each user turn up to `[Assistant]` and the task tag (unweighted), its reply
(weighted), and a weighted `<eos>` after the last reply; a prompt stops after the user turn to
answer. They differ only in how a reply is laid out, so the rest lives here once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from slm.errors import DataError
from slm.strategies.hearing import unit_view
from slm.strategies.tasks import TaskFormat
from slm.types import Grid, Segment
from slm.vocab import Vocab

# task -> (user modality, assistant modality) it takes; None: either
MODALITIES = {"answer": (None, None), "transcribe": ("speech", "text"), "tts": ("text", "speech")}


def turn_ids(name: str, task: str, segment: Segment, view: str, vocab: Vocab) -> np.ndarray:
    """The ids of one view (`text` or `units`) of a turn, checked against their range."""
    ids = getattr(segment, view)
    if ids is None:
        raise DataError(f"{name} ({task}): a {segment.role} {segment.modality} segment "
                        f"needs its {view!r} view")
    vocab.check_ids(ids if view == "text" else unit_view(ids, vocab),
                    ["text" if view == "text" else "units"],
                    f"{name}: {segment.role} segment {view!r}")
    return np.asarray(ids, np.int32).ravel()


def check_turn(name: str, task: str, segment: Segment, index: int) -> None:
    """Turns alternate user, assistant, starting with a user turn, in the task's modalities."""
    role = ("user", "assistant")[index % 2]
    modality = MODALITIES[task][index % 2]
    if segment.role != role or modality not in (None, segment.modality):
        raise DataError(f"{name} ({task}): segment {index} is a {segment.role} "
                        f"{segment.modality} turn; segments must alternate user, assistant, "
                        f"starting with a user turn, and this task needs "
                        f"{MODALITIES[task]} (user, assistant) modalities")


def user_turn(name: str, task: str, task_format: TaskFormat, user: Segment, vocab: Vocab) -> list[int]:
    """`[Human] {text, or <sosp> units <eosp>} <eoh> [Assistant]` and the task's prompt."""
    sp = vocab.special
    if user.modality == "speech":
        body = [sp("<sosp>"), *turn_ids(name, task, user, "units", vocab).tolist(), sp("<eosp>")]
    else:
        body = turn_ids(name, task, user, "text", vocab).tolist()
    tag = task_format.prompt(task, user.modality, vocab)
    return [sp("[Human]"), *body, sp("<eoh>"), sp("[Assistant]"), *tag]


def chat_grid(name: str, task: str, task_format: TaskFormat, segments: Sequence[Segment],
              vocab: Vocab, complete: bool, steps: Callable[[list[int], float], Grid],
              reply: Callable[[Segment, Segment], Grid]) -> Grid:
    """The chat's grid: a layout when `complete` (it ends with a reply), else a prompt (it ends
    with the user turn to answer). `steps(ids, weight)` lays ids out on the strategy's token
    stream; `reply(user, reply)` lays out one reply, weighted."""
    if not segments or len(segments) % 2 != (0 if complete else 1):
        what = "end with an assistant turn" if complete else "end with the user turn to answer"
        raise DataError(f"{name}: got {len(segments)} segments; they must {what}")
    for i, segment in enumerate(segments):
        check_turn(name, task, segment, i)
    parts = [steps([vocab.bos_id], 0.0)]
    for i in range(0, len(segments), 2):
        parts.append(steps(user_turn(name, task, task_format, segments[i], vocab), 0.0))
        if i + 1 < len(segments):
            parts.append(reply(segments[i], segments[i + 1]))
    if complete:
        parts.append(steps([vocab.eos_id], 1.0))
    return Grid.concat(parts)
