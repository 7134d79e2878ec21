"""The speech+text decoder: temporal stack, stream heads, depth decoder and KV caches."""

from slm.model.cache import DecodeState, LayerCache
from slm.model.heads import StreamSpec, to_flat, to_local
from slm.model.lm import Outputs, SpeechLM, build_streams

__all__ = ["DecodeState", "LayerCache", "Outputs", "SpeechLM", "StreamSpec", "build_streams",
           "to_flat", "to_local"]
