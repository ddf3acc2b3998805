"""Generation: the decoder protocol (decoder.py), sampling (sampling.py), the KV-cached engine
(engine.py), self-speculative decoding (speculative.py), adaptive depth (adaptive.py), and the one
factory from a mode spec (modes.py)."""

from .decoder import Decoder, GenerationStats, check_request
from .engine import Engine
from .modes import DecodeMode, make_decoder
from .sampling import SamplingParams, apply_repetition_penalty, sample_next, top_k_filter, top_p_filter

__all__ = ["DecodeMode", "Decoder", "Engine", "GenerationStats", "SamplingParams", "apply_repetition_penalty",
           "check_request", "make_decoder", "sample_next", "top_k_filter", "top_p_filter"]
