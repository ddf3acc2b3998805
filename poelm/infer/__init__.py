"""Generation: the decoder protocol (decoder.py), sampling (sampling.py), the KV-cached engine
(engine.py), batches and their cache (batch.py, cache.py), fleets (fleet.py), self-speculative
decoding (speculative.py), adaptive depth (adaptive.py), composition (compose.py), stop strings
(stops.py), and the one factory from a mode spec (modes.py). Design notes: docs/inference.md.
"""

from .decoder import Decoder, GenerationStats, check_request
from .engine import Engine, greedy
from .modes import DecodeMode, make_decoder
from .sampling import SamplingParams, apply_repetition_penalty, sample_next, top_k_filter, top_p_filter

__all__ = ["DecodeMode", "Decoder", "Engine", "GenerationStats", "SamplingParams", "apply_repetition_penalty",
           "check_request", "greedy", "make_decoder", "sample_next", "top_k_filter", "top_p_filter"]
