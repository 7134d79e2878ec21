"""Text tokenizers behind one small protocol, so the vocabulary does not care whose they are.

The vocabulary (`slm.vocab.Vocab`) gives text its own id range and keeps its own specials
(<bos>, <eos>, <pad>, ...), so a tokenizer here only maps text to piece ids and back: it never
adds special tokens. `pieces()` names every id so the vocabulary can store the strings and
refuse a checkpoint trained with a different tokenizer.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from slm.errors import ConfigError, DataError, VocabError

SPM_MODEL_NAME = "spm.model"


class TextTokenizer(Protocol):
    vocab_size: int

    def pieces(self) -> list[str]:
        """One printable string per id, in id order."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def spec(self) -> dict:
        """JSON-able description that `load_text_tokenizer` rebuilds the tokenizer from."""


def _checked_text(text: Any) -> str:
    """Only well-formed text: bytes must be decoded by the caller, who knows their encoding."""
    if isinstance(text, bytes):
        raise DataError(f"text must be str, got bytes {text[:20]!r}...; decode it first, "
                        f"e.g. data.decode('utf-8')")
    if not isinstance(text, str):
        raise DataError(f"text must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"text is not valid UTF-8 ({err.reason} at index {err.start}); "
                        f"fix the transcript's encoding") from err
    return text


def _checked_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise VocabError(f"text ids must lie in [0, {vocab_size}), got {bad[0]}")
    return ids


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"{path}: no such {what}")
    return path


# --- SentencePiece --------------------------------------------------------------------------

class SentencePieceTokenizer:
    """A SentencePiece model, trained by `train_sentencepiece` or brought along."""

    def __init__(self, processor: Any, model_path: Path):
        self._sp = processor
        self.model_path = model_path
        self.vocab_size = processor.get_piece_size()

    @classmethod
    def load(cls, model_path: str | Path) -> SentencePieceTokenizer:
        import sentencepiece as spm

        path = _existing(model_path, "SentencePiece model file")
        try:
            processor = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ConfigError(f"{path}: not a SentencePiece model ({err})") from err
        return cls(processor, path)

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(_checked_text(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_checked_ids(ids, self.vocab_size))

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "model_path": str(self.model_path)}


def train_sentencepiece(lines: Iterable[str], out_dir: str | Path, vocab_size: int,
                        model_type: str = "unigram", seed: int = 0,
                        byte_fallback: bool = False) -> SentencePieceTokenizer:
    """Train on `lines` in-process and save `out_dir/spm.model`.

    `vocab_size` is an upper bound: a corpus too small to fill it yields fewer pieces rather
    than an error, and the returned tokenizer's `vocab_size` is the real size. SentencePiece's
    own <s>, </s> and <pad> are disabled because the vocabulary has its own; <unk> stays at id 0
    because SentencePiece needs it. The same lines, settings and seed give the same model.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ConfigError(f"model_type={model_type!r}; SentencePiece training supports 'unigram' or 'bpe'")
    texts = [_checked_text(line) for line in lines if line.strip()]
    if not texts:
        raise DataError("no non-empty lines to train the SentencePiece model on")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            hard_vocab_limit=False, byte_fallback=byte_fallback,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
    except RuntimeError as err:
        raise ConfigError(f"SentencePiece training failed with vocab_size={vocab_size}: {err}") from err
    path = Path(out_dir).expanduser().resolve() / SPM_MODEL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer.load(path)


# --- Hugging Face -----------------------------------------------------------------------------

class HFTokenizer:
    """A pretrained LLM's tokenizer from a local directory, so text ids match its embeddings."""

    def __init__(self, tokenizer: Any, model_dir: Path):
        self._tok = tokenizer
        self.model_dir = model_dir
        self._pieces = _id_ordered_pieces(tokenizer.get_vocab())
        self.vocab_size = len(self._pieces)

    @classmethod
    def load(cls, model_dir: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer

        path = _existing(model_dir, "tokenizer directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot load a tokenizer from it ({err})") from err
        return cls(tokenizer, path)

    def pieces(self) -> list[str]:
        return list(self._pieces)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(_checked_text(text), add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_checked_ids(ids, self.vocab_size), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def spec(self) -> dict:
        return {"kind": "hf", "model_dir": str(self.model_dir)}


def _id_ordered_pieces(token_to_id: dict[str, int]) -> list[str]:
    """Pieces for ids 0..max id, added tokens included because encode can emit them. An id no
    token owns prints as <tN>, the name the vocabulary gives unnamed text ids anyway."""
    by_id = {i: token for token, i in token_to_id.items()}
    return [by_id.get(i, f"<t{i}>") for i in range(max(by_id) + 1)]


# --- specs ------------------------------------------------------------------------------------

def load_text_tokenizer(spec: dict) -> SentencePieceTokenizer | HFTokenizer:
    """Rebuild a tokenizer from its `spec()`, e.g. the one saved beside a checkpoint."""
    kind = spec.get("kind")
    if kind == "sentencepiece":
        return SentencePieceTokenizer.load(spec["model_path"])
    if kind == "hf":
        return HFTokenizer.load(spec["model_dir"])
    raise ConfigError(f"text tokenizer spec has kind={kind!r}; use 'sentencepiece' or 'hf'")
