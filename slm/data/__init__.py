"""Token sources for training: anything that yields `[B, K, T]` token/weight batches and can
save and restore its position."""

from slm.data.source import TokenSource, make_source

__all__ = ["TokenSource", "make_source"]
