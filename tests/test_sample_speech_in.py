"""`slm sample --speech-in`: replies and transcripts of a wave file, and its bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from slm.data.tokenize import tokenize_words
from slm.errors import AudioError, TaskError
from slm.reply import asked, load_speaker
from slm.speech.audio import load_audio
from slm.strategies.tasks import time_tokens
from slm.train.trainer import train
from tests.conftest import REPO, SUBPROCESS_ENV
from tests.test_records_training import _config

QWEN_SRWT = ["strategy.task_format={style: qwen_audio, timestamps: true, max_time: 8.0}",
             "data.mixture={dialogue: 1.0, asr: 1.0}"]


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    """A few steps of a tiny chain-of-modality model on dialogues and timed ASR pairs."""
    from tests.conftest import one_device_mesh

    root, _ = prepared
    directory = tmp_path_factory.mktemp("srwt")
    config = _config(root, "chain_of_modality", "train.steps=3", f"checkpoint.dir={directory}",
                     *QWEN_SRWT)
    train(config, mesh=one_device_mesh(), progress=False)
    return root, directory, config


def _utterance(root):
    return json.loads((root / "corpus" / "heldout" / "utterances.jsonl").read_text().splitlines()[0])


def test_srwt_of_a_corpus_utterance_decodes_to_its_words_and_times(checkpoint, single_mesh):
    root, directory, config = checkpoint
    speaker = load_speaker(directory, mesh=single_mesh, task="transcribe")
    utt, vocab, step = _utterance(root), speaker.vocab, config.strategy.task_format.time_step
    record = tokenize_words(utt["text"], speaker.tokenizers)
    times = np.array([[s, e] for _, s, e in utt["words"]], np.float32)
    ids = speaker.strategy.format.transcript(vocab.text_id(record["text_ids"]),
                                             record["word_token_ends"], times, vocab)
    assert sum(vocab.to_string(i) in time_tokens(config.strategy.task_format) for i in ids) \
        == 2 * len(utt["words"])
    decoded = speaker.timed_words(ids)
    assert [w for w, _, _ in decoded] == utt["text"].split()
    got = np.array([[a, b] for _, a, b in decoded])
    assert np.abs(got - times).max() <= step  # within one resolution step (half, by rounding)


def test_transcribing_a_wave_uses_the_tags_it_was_trained_with(checkpoint, single_mesh):
    root, directory, _ = checkpoint
    speaker = load_speaker(directory, mesh=single_mesh, task="transcribe", max_steps=12,
                           greedy=True)
    user = speaker.hear(load_audio(root / "corpus" / _utterance(root)["audio"], 16000), 16000)
    prompt = speaker.prompt([user]).tokens[0]
    assert speaker.vocab.render(prompt[-6:]).split() == (
        "[Assistant] <|startoftranscript|> <|en|> <|transcribe|> <|en|> <|timestamps|>").split()
    reply = speaker.reply([user], jax.random.key(0))
    allowed = set(speaker.strategy.format.transcript_ids(speaker.vocab))
    allowed |= {speaker.vocab.special("<eoa>"), speaker.vocab.pad_id}
    assert set(reply.written.tolist()) <= allowed  # a transcript, timed, whatever it says
    assert all(s.modality == "text" for s in reply.segments) and reply.wave is None


def test_a_model_is_asked_only_for_tasks_it_was_trained_for(checkpoint, single_mesh):
    _, _, config = checkpoint
    untrained = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                     mixture={"dialogue": 1.0}))
    with pytest.raises(TaskError, match="asr"):
        asked(untrained, "transcribe", "runs/x")
    parallel = dataclasses.replace(config, strategy=dataclasses.replace(
        config.strategy, name="parallel", options={}))
    with pytest.raises(TaskError, match="no task tags"):
        asked(parallel, "transcribe", "runs/x")
    assert asked(parallel, "answer", "runs/x") is parallel.strategy  # it answers as trained
    assert asked(config, "transcribe", "runs/x").options["task"] == "transcribe"


def test_a_wave_of_the_wrong_shape_is_refused(checkpoint, single_mesh, tmp_path):
    root, directory, _ = checkpoint
    speaker = load_speaker(directory, mesh=single_mesh, max_steps=4)
    wave = load_audio(root / "corpus" / _utterance(root)["audio"], 16000)
    with pytest.raises(AudioError, match="mono float samples"):
        speaker.hear(np.stack([wave, wave]), 16000)  # stereo
    with pytest.raises(AudioError, match="mono float samples"):
        speaker.hear((wave * 32767).astype(np.int16), 16000)  # integer PCM
    with pytest.raises(AudioError, match="too short"):
        speaker.hear(wave[:800], 16000)
    garbage = tmp_path / "question.wav"
    garbage.write_bytes(b"RIFF not really a wave")
    with pytest.raises(AudioError, match="convert it"):
        load_audio(garbage, 16000)


def _sample(*args):
    return subprocess.run([sys.executable, "-m", "slm.cli", "sample", *args], capture_output=True,
                          text=True, cwd=REPO, env=SUBPROCESS_ENV)


def test_cli_transcribes_a_wave_and_names_a_missing_one(checkpoint, tmp_path):
    root, directory, _ = checkpoint
    wave = root / "corpus" / _utterance(root)["audio"]
    done = _sample("--checkpoint", str(directory), "--speech-in", str(wave), "--task",
                   "transcribe", "--max-steps", "8", "--greedy")
    assert done.returncode == 0, done.stderr
    assert "transcript:" in done.stdout
    missing = _sample("--checkpoint", str(directory), "--speech-in", str(tmp_path / "no.wav"))
    assert missing.returncode == 2 and "no such audio file" in missing.stderr
    assert os.path.basename(str(tmp_path / "no.wav")) in missing.stderr


def test_training_batches_carry_the_tags_and_the_word_times(checkpoint):
    from slm.data.source import make_source
    from slm.train.trainer import vocab_from_config

    _, _, config = checkpoint
    vocab = vocab_from_config(config)
    source = make_source(config, vocab)
    tokens = np.concatenate([next(source)["tokens"].ravel() for _ in range(4)])
    named = {vocab.to_string(int(i)) for i in np.unique(tokens) if i < vocab.range("text").start}
    assert {"<|startoftranscript|>", "<|timestamps|>", "<|startofanalysis|>"} <= named
    assert len(named & set(time_tokens(config.strategy.task_format))) > 4
