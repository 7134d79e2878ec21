"""The speech+text decoder: temporal stack, stream heads, depth decoder and KV caches."""

from slm.model.cache import DecodeState, LayerCache
from slm.model.heads import to_flat, to_local
from slm.model.lm import Outputs, SpeechLM
from slm.model import unit_decoder  # noqa: F401, E402  registers the ctc_units head kind

__all__ = ["DecodeState", "LayerCache", "Outputs", "SpeechLM", "to_flat", "to_local"]
