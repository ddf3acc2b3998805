"""Generation: the KV-cached sampling engine (engine.py)."""

from .engine import (Engine, GenerationStats, SamplingParams, apply_repetition_penalty, sample_next,
                     top_k_filter, top_p_filter)

__all__ = ["Engine", "GenerationStats", "SamplingParams", "apply_repetition_penalty", "sample_next",
           "top_k_filter", "top_p_filter"]
