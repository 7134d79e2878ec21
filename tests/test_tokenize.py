"""Corpus -> tokenizers -> ArrayRecord shards, on a tiny synthesized corpus; bad audio is skipped."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from slm.config import TokenizersConfig
from slm.data import records
from slm.data.prepare import tokenize_corpus, train_corpus_tokenizers
from slm.data.tokenizers import TokenizerSet
from tests.conftest import SIZES

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")


def test_every_split_is_tokenized(prepared):
    _, summary = prepared
    assert summary["train-sentences"]["records"] == SIZES.train_sentences
    assert summary["train-dialogues"]["records"] == SIZES.train_dialogues
    # one set of held-out dialogues per test set (voices, phrasings, transfer)
    assert summary["heldout-dialogues"]["records"] == 3 * SIZES.heldout_dialogues
    assert summary["text"]["records"] == SIZES.text_lines
    assert summary["text-dialogues"]["records"] == SIZES.text_dialogues
    assert all(not s["skipped"] for s in summary.values())


def test_records_hold_consistent_views_of_each_utterance(prepared):
    root, _ = prepared
    tok = TokenizerSet.load(root / "tok")
    dialogue = records.decode(records.data_source(root / "shards", "train-dialogues")[0])
    for utt in (dialogue["question"], dialogue["answer"]):
        assert tok.text.decode(utt["text_ids"].tolist()) == utt["text"]
        assert utt["word_token_ends"][-1] == len(utt["text_ids"])
        assert len(utt["word_times"]) == len(utt["text"].split())
        assert abs(len(utt["units"]) - utt["duration"] * utt["unit_rate"]) <= 2
        assert utt["codes"].shape[0] == 2 and abs(utt["codes"].shape[1] - len(utt["units"])) <= 1
        assert utt["units"].max() < 16 and utt["codes"].max() < 16
    assert dialogue["answer_text"] == dialogue["answer"]["text"]
    vocab = tok.vocab()
    assert vocab.range("units").size == 16 and vocab.num_codebooks == 2


def _corrupt(corpus, name, how):
    utts = [json.loads(line) for line in (corpus / "train" / "utterances.jsonl").read_text().splitlines()]
    sentences = [u for u in utts if u["kind"] == "sentence"]
    path = corpus / sentences[name]["audio"]
    wave, rate = sf.read(path, dtype="float32")
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:30])
    elif how == "garbage":
        path.write_bytes(b"this is not audio at all" * 40)
    elif how == "silent":
        sf.write(path, np.zeros_like(wave), rate)
    elif how == "22050":
        import soxr

        sf.write(path, soxr.resample(wave, rate, 22050), 22050)


def test_bad_audio_is_counted_and_skipped_and_rerun_resumes(prepared, tmp_path):
    root, _ = prepared
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    for index, how in enumerate(["truncated", "garbage", "silent", "22050"]):
        _corrupt(corpus, index, how)
    out = tmp_path / "shards"
    summary = tokenize_corpus(corpus, root / "tok", out, workers=1, progress=False)
    sentences = summary["train-sentences"]
    assert sentences["skipped"] == {"AudioError": 2, "DataError": 1}  # 22050 Hz is resampled
    assert sentences["records"] == SIZES.train_sentences - 3

    shard = records.shard_path(out, "train-sentences", 0)
    untouched = records.shard_path(out, "text", 0)
    before = untouched.stat().st_mtime_ns
    shard.unlink()
    again = tokenize_corpus(corpus, root / "tok", out, workers=1, progress=False)
    assert shard.is_file() and untouched.stat().st_mtime_ns == before
    assert again == summary


def test_over_long_utterances_are_skipped(prepared, tmp_path):
    root, _ = prepared
    summary = tokenize_corpus(root / "corpus", root / "tok", tmp_path, max_seconds=1.0,
                              workers=1, progress=False)
    skipped = summary["train-sentences"]["skipped"].get("DataError", 0)
    assert 0 < skipped <= SIZES.train_sentences
    assert summary["train-sentences"]["records"] == SIZES.train_sentences - skipped


def test_pretrained_encoder_and_codec_take_the_same_path(prepared, tmp_path):
    """HuBERT units and a Mimi codec from local directories, as a user with real weights runs them."""
    transformers = pytest.importorskip("transformers")
    from tests.test_hf_encoders import CODEC_SMALL, SSL_SMALL

    root, _ = prepared
    hubert, mimi = tmp_path / "hubert", tmp_path / "mimi"
    transformers.HubertModel(transformers.HubertConfig(**SSL_SMALL)).save_pretrained(hubert)
    transformers.MimiModel(transformers.MimiConfig(
        **CODEC_SMALL, num_quantizers=4, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        vector_quantization_hidden_dimension=16, upsample_groups=16, sliding_window=16,
        max_position_embeddings=512)).save_pretrained(mimi)
    cfg = TokenizersConfig(text_vocab_size=64, num_units=8, unit_features="hf",
                           hf_encoder_dir=str(hubert), hf_encoder_layer=1, codec="hf",
                           hf_codec_dir=str(mimi), num_codebooks=2, train_clips=4)
    train_corpus_tokenizers(cfg, root / "corpus", tmp_path / "tok")
    tok = TokenizerSet.load(tmp_path / "tok")
    assert tok.codec.num_codebooks == 2 and tok.units.num_units == 8
    summary = tokenize_corpus(root / "corpus", tmp_path / "tok", tmp_path / "shards", workers=1,
                              progress=False)
    assert summary["heldout-sentences"]["records"] == SIZES.heldout_sentences
    utt = records.decode(records.data_source(tmp_path / "shards", "heldout-sentences")[0])
    assert utt["codes"].shape[0] == 2 and utt["codes"].max() < 64
    assert utt["unit_rate"] == 800.0 and utt["code_rate"] == 250.0


def test_units_are_phonetic_on_held_out_voices(prepared):
    from slm.eval.units import frame_labels, phoneme_purity

    labels = frame_labels([["a", 0.0, 0.04], ["b", 0.04, 0.1]], num_frames=6, frame_rate=50.0)
    assert labels.tolist() == ["a", "a", "b", "b", "b", ""]
    root, _ = prepared
    result = phoneme_purity(root / "corpus", root / "tok", "heldout")
    # 16 MFCC units over ~40 phonemes: chance purity is the most common phoneme's share (< 0.15)
    assert result["frames"] > 500 and result["purity"] > 0.2 and result["pnmi"] > 0.2
