"""The speech+text decoder: temporal stack, stream heads, depth decoder and KV caches."""

from slm.model.cache import DecodeState, LayerCache
from slm.model.heads import to_flat, to_local
from slm.model.lm import Outputs, SpeechLM

__all__ = ["DecodeState", "LayerCache", "Outputs", "SpeechLM", "to_flat", "to_local"]
