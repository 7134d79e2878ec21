"""Task tags: the prompt names the task its reply performs (Whisper / Qwen-Audio style).

One model learns to answer, transcribe and speak from one mixture when each prompt says which
of these its reply does. The data layer only knows what a record becomes (a dialogue, an ASR
pair, ...; see slm.data.examples); which reply task that trains, and its tag, is named here
once. A strategy that tags tasks takes an options field `task`, which `make_strategy` sets
per data task; strategies whose layout already shows the reply's modality have none.
"""

from __future__ import annotations

TAGS = {"answer": None, "transcribe": "<|transcribe|>", "tts": "<|tts|>"}  # None: untagged
_TRAINED_BY = {"asr": "transcribe", "tts": "tts"}  # data task -> the reply task it trains


def reply_task(data_task: str, configured: str) -> str:
    """The reply task examples of `data_task` train: their own if they have one (an ASR pair
    trains `transcribe`), else the configured `strategy.options.task`."""
    return _TRAINED_BY.get(data_task, configured)
