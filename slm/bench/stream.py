"""Ω, how often a streamed reply goes to the vocoder: latency against intelligibility.

Text-driven generation (LLaMA-Omni) writes one text token per step, and its unit decoder
speaks each state as soon as it exists; a voice interface synthesizes and plays the new units
every Ω text tokens (`Speaker.stream` with `chunk_steps = Ω`). A small Ω brings the first
audio sooner, but the vocoder then makes the reply out of many short pieces, each with only
`slm.reply.STREAM_CONTEXT_FRAMES` frames of context; a large Ω waits for more text first.

For each Ω the same replies are streamed (greedy, so they are the same replies), and this
reports the reply steps and milliseconds until the first chunk that holds audio, and the
judge's CER of the streamed speech against the reply's own text (`speech_cer`, as
`slm.eval.spoken_qa` scores every strategy's replies). The first reply of each prompt length
bucket is streamed twice per Ω and only the second is timed, so compiling is not latency.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from slm.errors import ConfigError
from slm.eval.judge import Judge, corpus_rates, snap
from slm.eval.spoken_qa import build_conditions, listen, transcribe_waves
from slm.reply import Speaker
from slm.sample import prompt_bucket
from slm.types import Segment


@dataclasses.dataclass
class Streamed:
    """One reply as a player received it."""

    text: str
    wave: np.ndarray  # every chunk's audio, in order
    steps: int
    chunks: int
    steps_to_first_audio: int  # the reply steps sampled when the first audio came; -1: none
    ms_to_first_audio: float | None  # since the stream started (prefill included)


def stream_reply(speaker: Speaker, user: Sequence[Segment], key: jax.Array, omega: int) -> Streamed:
    """The reply streamed in chunks of Ω steps, as a player would have received it."""
    chunks = list(speaker.stream(user, key, chunk_steps=omega))
    first = next((c for c in chunks if c.audio is not None and c.audio.size), None)
    audio = [c.audio for c in chunks if c.audio is not None]
    return Streamed(text="".join(c.text for c in chunks),
                    wave=np.concatenate(audio) if audio else np.zeros(0, np.float32),
                    steps=chunks[-1].step if chunks else 0, chunks=len(chunks),
                    steps_to_first_audio=first.step if first else -1,
                    ms_to_first_audio=1e3 * first.seconds if first else None)


def omega_trade(speaker: Speaker, users: Sequence[Sequence[Segment]], judge: Judge,
                omegas: Sequence[int], seed: int = 0) -> list[dict]:
    """Per Ω: latency medians over the replies that spoke, and the judge's corpus CER over all
    of them (a reply without sound counts as all deletions)."""
    if not users or not omegas or min(omegas) < 1:
        raise ConfigError(f"slm bench stream: --omega {list(omegas)} over {len(users)} questions; "
                          "give at least one question and Ω values >= 1 (text tokens per chunk)")
    results = []
    for omega in omegas:
        replies, warm = [], set()
        for i, user in enumerate(users):
            bucket = prompt_bucket(speaker.prompt(user).tokens.shape[-1])
            if bucket not in warm:
                stream_reply(speaker, user, jax.random.key(seed + i), omega)
                warm.add(bucket)
            replies.append(stream_reply(speaker, user, jax.random.key(seed + i), omega))
        raw = transcribe_waves(judge, [r.wave for r in replies], speaker.sample_rate)
        heard = [snap(h) for h in raw]
        texts = [r.text for r in replies]
        spoke = [r for r in replies if r.steps_to_first_audio >= 0]
        results.append({
            "omega": omega, "replies": len(replies), "spoke": len(spoke),
            "steps_to_first_audio": float(np.median([r.steps_to_first_audio for r in spoke]))
            if spoke else None,
            "ms_to_first_audio": float(np.median([r.ms_to_first_audio for r in spoke]))
            if spoke else None,
            "speech_cer": corpus_rates(heard, texts)[0],
            "raw_speech_cer": corpus_rates(raw, texts)[0],
            "answers": [{"text": r.text, "heard": h, "steps": r.steps, "chunks": r.chunks,
                         "steps_to_first_audio": r.steps_to_first_audio,
                         "ms_to_first_audio": r.ms_to_first_audio}
                        for r, h in zip(replies, heard)]})
    return results


def bench_stream(checkpoint: str | Path, root: str | Path, omegas: Sequence[int],
                 questions: int = 20, max_steps: int = 96, judge_steps: int = 1000) -> dict:
    """`omega_trade` for a checkpoint on the `voices` test set of the corpus under `root` (a
    `slm demo` or `slm ablate` output), judged by `root`'s judge (trained there if missing)."""
    from slm.bench.machine import machine_info
    from slm.demo import load_or_train_judge
    from slm.reply import load_speaker

    machine, root = machine_info(), Path(root)
    speaker = load_speaker(str(checkpoint), max_steps=max_steps, greedy=True)
    asked = build_conditions(root / "corpus", questions, ("voices",))["voices"]
    users = [[speaker.spoken_turn(heard)] for heard in listen(speaker.tokenizers, asked)]
    judge = load_or_train_judge(root, judge_steps)
    return {"benchmark": "stream", "machine": machine, "checkpoint": str(checkpoint),
            "strategy": speaker.strategy.name,
            "questions": len(users), "max_steps": max_steps, "judge": str(root / "judge"),
            "omegas": omega_trade(speaker, users, judge, omegas)}


def summary(result: dict) -> str:
    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'Ω':>3} {'steps to audio':>15} {'ms to audio':>12} {'speech CER':>11} {'spoke':>7}"]
    for row in result["omegas"]:
        lines.append(f"{row['omega']:>3} {number(row['steps_to_first_audio'], '.1f'):>15} "
                     f"{number(row['ms_to_first_audio'], '.0f'):>12} {row['speech_cer']:>11.3f} "
                     f"{row['spoke']:>3}/{row['replies']:<3}")
    return "\n".join(lines)
