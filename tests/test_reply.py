"""Spoken replies from a checkpoint: whole, streamed, and through `slm sample`."""

import json
import os
import subprocess
import sys

import jax
import librosa
import numpy as np
import pytest

from slm.reply import load_speaker
from slm.speech.audio import load_audio
from slm.train.trainer import train
from tests.conftest import REPO
from tests.test_records_training import _config


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    from tests.conftest import one_device_mesh

    root, _ = prepared
    directory = tmp_path_factory.mktemp("c2f")
    # 8 steps: after 2, whether the acoustic streams end at once depends on the random init
    train(_config(root, "coarse_to_fine", "train.steps=8", f"checkpoint.dir={directory}"),
          mesh=one_device_mesh(), progress=False)
    return root, directory


def _question(root):
    utt = json.loads((root / "corpus" / "heldout" / "utterances.jsonl").read_text().splitlines()[0])
    return load_audio(root / "corpus" / utt["audio"], 16000)


def test_streaming_yields_audio_before_the_reply_ends_and_matches_the_whole_reply(checkpoint, single_mesh):
    root, directory = checkpoint
    speaker = load_speaker(directory, mesh=single_mesh, max_steps=24, greedy=True)
    user = speaker.hear(_question(root), 16000)
    whole = speaker.reply([user], jax.random.key(0))
    chunks = list(speaker.stream([user], jax.random.key(0), chunk_steps=4))
    first_audio = next(i for i, c in enumerate(chunks) if c.audio is not None)
    assert chunks[first_audio].step < chunks[-1].step  # audio arrives before the reply ends
    assert chunks[-1].step == whole.steps
    # each chunk is decoded with the frames before it as context, so the chunks join into the
    # whole reply's wave: as long, and (Griffin-Lim phases aside) the same sound
    streamed = np.concatenate([c.audio for c in chunks if c.audio is not None])
    assert streamed.size == whole.wave.size
    # mean |log-mel difference|: 0.75 on the demo model (2.4 when each chunk was decoded alone)
    log_mel = lambda w: np.log(librosa.feature.melspectrogram(  # noqa: E731
        y=w, sr=16000, n_fft=800, hop_length=320, n_mels=40) + 1e-5)
    gap = float(np.mean(np.abs(log_mel(streamed) - log_mel(whole.wave))))
    print(f"streamed vs whole reply: mean |log-mel difference| {gap:.2f}")
    assert gap < 1.2
    assert 0 <= whole.steps_to_first_audio <= chunks[first_audio].step
    assert 0 < whole.seconds_to_first_audio <= whole.seconds + 1e-9


def test_text_questions_and_vocabulary_checks(checkpoint, single_mesh, tmp_path):
    from slm.errors import DataError, VocabError

    root, directory = checkpoint
    speaker = load_speaker(directory, mesh=single_mesh, max_steps=8)
    question = speaker.read("what is two plus two")
    assert speaker.tokenizers.text.decode(speaker.vocab.local("text", question.text).tolist()) \
        == "what is two plus two"
    with pytest.raises(DataError, match="speech segments"):  # Moshi's layout hears, never reads
        speaker.reply([question], jax.random.key(1))
    # tokenizers of another vocabulary are refused
    from slm.config import TokenizersConfig
    from slm.data.prepare import train_corpus_tokenizers

    other = TokenizersConfig(text_vocab_size=64, num_units=12, num_codebooks=2, codebook_size=16,
                             train_clips=8)
    train_corpus_tokenizers(other, root / "corpus", tmp_path / "tok")
    with pytest.raises(VocabError, match="units"):
        load_speaker(directory, tokenizers_dir=str(tmp_path / "tok"), mesh=single_mesh)


def test_cli_sample_writes_the_spoken_reply_decoding_across_devices(checkpoint, tmp_path):
    root, directory = checkpoint
    utt = json.loads((root / "corpus" / "heldout" / "utterances.jsonl").read_text().splitlines()[0])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = tmp_path / "reply.wav"
    done = subprocess.run(
        [sys.executable, "-m", "slm.cli", "sample", "--checkpoint", str(directory), "--speech-in",
         str(root / "corpus" / utt["audio"]), "--out", str(out), "--max-steps", "12", "--greedy",
         "--mesh", "tensor=2"],  # trained on one device, its heads now split over two
        capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert "text reply:" in done.stdout and out.is_file()


def test_unit_replies_are_spoken_by_the_unit_vocoder(prepared, single_mesh, tmp_path):
    root, _ = prepared
    train(_config(root, "parallel", "train.steps=2", f"checkpoint.dir={tmp_path}"),
          mesh=single_mesh, progress=False)
    speaker = load_speaker(tmp_path, mesh=single_mesh, max_steps=16)
    user = speaker.hear(_question(root), 16000)
    reply = speaker.reply([user], jax.random.key(0))
    assert speaker.hearing.dedup  # parallel hears de-duplicated units, as it was trained
    assert np.all(np.diff(user.units) != 0)
    (turn,) = [s for s in reply.segments if s.modality == "speech"]
    units = turn.units[np.isin(turn.units, speaker.vocab.ids("units"))]
    assert units.size >= 2 and reply.wave is not None
    assert abs(reply.wave.size - (units.size - 1) * 320) <= 320


def test_text_driven_speaks_each_chunk_of_its_text_as_it_streams(prepared, single_mesh, tmp_path):
    from flax import nnx

    from slm.bench.strategies import endless
    from slm.sample import GREEDY, Sampler

    root, _ = prepared
    train(_config(root, "text_driven", "train.steps=2", f"checkpoint.dir={tmp_path}"),
          mesh=single_mesh, progress=False)
    speaker = load_speaker(tmp_path, mesh=single_mesh, max_steps=12, greedy=True)
    # an untrained model may end its answer at once: keep it writing, so every state speaks
    model = nnx.merge(speaker.sampler.graphdef, speaker.sampler.params)
    speaker.sampler = Sampler(model, endless(speaker.strategy.policy(speaker.vocab)), speaker.vocab,
                              (GREEDY,) * len(model.streams), max_steps=12)
    user = speaker.hear(_question(root), 16000)
    whole = speaker.reply([user], jax.random.key(0))
    chunks = list(speaker.stream([user], jax.random.key(0), chunk_steps=3))  # Ω = 3 text tokens
    assert [c.step for c in chunks] == [3, 6, 9, 12] and whole.steps == 12
    # the units of every chunk's text are spoken in that chunk, not after the whole answer
    assert all(c.audio is not None and c.audio.size for c in chunks[1:]), [c.step for c in chunks]
    streamed = np.concatenate([c.audio for c in chunks if c.audio is not None])
    assert streamed.size == whole.wave.size
    assert 1 <= whole.steps_to_first_audio <= 3
