"""Text tokenizers: SentencePiece models trained here, or a pretrained LLM's own tokenizer."""

from slm.text.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    load_text_tokenizer,
    train_sentencepiece,
)

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "TextTokenizer", "load_text_tokenizer", "train_sentencepiece"]
