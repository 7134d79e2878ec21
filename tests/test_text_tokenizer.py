"""Text tokenizers: SentencePiece training and reloading, local HF tokenizers, bad input."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may reach the hub

import random  # noqa: E402

import pytest  # noqa: E402

from slm.errors import ConfigError, DataError, VocabError  # noqa: E402
from slm.text import HFTokenizer, SentencePieceTokenizer, load_text_tokenizer, train_sentencepiece  # noqa: E402
from slm.vocab import Vocab  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while speech models listen to audio frames".split()


def corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> SentencePieceTokenizer:
    return train_sentencepiece(corpus(), tmp_path_factory.mktemp("spm"), vocab_size=64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny BPE tokenizer built locally and saved the way a pretrained LLM's would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "<|end|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.decoder = decoders.ByteLevel()
    path = tmp_path_factory.mktemp("hf_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|end|>").save_pretrained(path)
    return path


# --- SentencePiece ------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trip(tmp_path, model_type):
    tok = train_sentencepiece(corpus(), tmp_path, vocab_size=64, model_type=model_type)
    text = "the lazy fox listens to speech"
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_sentencepiece_pieces_fill_the_text_range(spm_tok):
    pieces = spm_tok.pieces()
    assert len(pieces) == spm_tok.vocab_size <= 64
    assert pieces[0] == "<unk>"  # SentencePiece's own <s>, </s>, <pad> are disabled
    assert not {"<s>", "</s>", "<pad>"} & set(pieces)
    vocab = Vocab.build(text_size=spm_tok.vocab_size, text_pieces=pieces)
    assert vocab.range("text").size == spm_tok.vocab_size


def test_sentencepiece_reports_real_size_of_a_tiny_corpus(tmp_path):
    tok = train_sentencepiece(corpus(20), tmp_path, vocab_size=5000)
    assert 0 < tok.vocab_size < 5000 and len(tok.pieces()) == tok.vocab_size


def test_sentencepiece_training_is_deterministic(tmp_path):
    a = train_sentencepiece(corpus(), tmp_path / "a", vocab_size=64, seed=3)
    b = train_sentencepiece(corpus(), tmp_path / "b", vocab_size=64, seed=3)
    assert a.model_path.read_bytes() == b.model_path.read_bytes()


def test_sentencepiece_spec_round_trip(spm_tok):
    again = load_text_tokenizer(spm_tok.spec())
    assert isinstance(again, SentencePieceTokenizer)
    assert again.pieces() == spm_tok.pieces()
    assert again.encode("a quick dog") == spm_tok.encode("a quick dog")


def test_sentencepiece_byte_fallback_covers_unseen_characters(tmp_path):
    tok = train_sentencepiece(corpus(), tmp_path, vocab_size=400, byte_fallback=True)
    assert "<0xE2>" in tok.pieces()
    assert tok.decode(tok.encode("fox ☃")) == "fox ☃"


@pytest.mark.parametrize("vocab_size, model_type", [(5, "unigram"), (64, "word")])
def test_sentencepiece_bad_settings(tmp_path, vocab_size, model_type):
    with pytest.raises(ConfigError, match="vocab_size|model_type"):
        train_sentencepiece(corpus(), tmp_path, vocab_size=vocab_size, model_type=model_type)


def test_sentencepiece_needs_lines(tmp_path):
    with pytest.raises(DataError, match="no non-empty lines"):
        train_sentencepiece(["", "  "], tmp_path, vocab_size=64)


# --- Hugging Face ---------------------------------------------------------------------------

def test_hf_tokenizer_loads_locally_and_round_trips(hf_dir):
    tok = HFTokenizer.load(hf_dir)
    text = "the quick brown fox"
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text
    assert tok.encode("<|end|>") == [tok.pieces().index("<|end|>")]  # no <bos>/<eos> added around text
    assert len(tok.pieces()) == tok.vocab_size


def test_hf_tokenizer_spec_round_trip(hf_dir):
    tok = HFTokenizer.load(hf_dir)
    again = load_text_tokenizer(tok.spec())
    assert isinstance(again, HFTokenizer) and again.pieces() == tok.pieces()


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [{"kind": "sentencepiece", "model_path": "/nonexistent/spm.model"},
                                  {"kind": "hf", "model_dir": "/nonexistent/tokenizer"}])
def test_missing_model_path(spec):
    with pytest.raises(ConfigError, match="/nonexistent"):
        load_text_tokenizer(spec)


def test_unknown_spec_kind():
    with pytest.raises(ConfigError, match="kind='tiktoken'"):
        load_text_tokenizer({"kind": "tiktoken"})


def test_not_a_model_file(tmp_path):
    junk = tmp_path / "spm.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        SentencePieceTokenizer.load(junk)


@pytest.mark.parametrize("text", [b"caf\xe9", "caf\udce9", 42])
def test_encode_accepts_only_valid_str(spm_tok, hf_dir, text):
    for tok in (spm_tok, HFTokenizer.load(hf_dir)):
        with pytest.raises(DataError):
            tok.encode(text)


def test_decode_rejects_ids_outside_the_tokenizer(spm_tok):
    with pytest.raises(VocabError, match=str(spm_tok.vocab_size)):
        spm_tok.decode([0, spm_tok.vocab_size])
