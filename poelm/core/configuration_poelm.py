"""Hugging Face configuration for poelm models (remote code): a thin carrier of `PoEConfig`'s fields,
validated there, with the standard attribute names transformers looks for (docs/model.md §9.6).
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .config import PoEConfig

_POE_FIELDS = tuple(f.name for f in dataclasses.fields(PoEConfig))


class PoelmConfig(PretrainedConfig):
    model_type = "poelm"
    attribute_map = {
        "num_hidden_layers": "n_layer",
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    def __init__(self, **kwargs):
        poe = PoEConfig(**{k: kwargs.pop(k) for k in _POE_FIELDS if k in kwargs})  # validates, derives
        for name, value in poe.to_dict().items():
            setattr(self, name, value)
        kwargs.setdefault("tie_word_embeddings", False)
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)

    def to_poe_config(self) -> PoEConfig:
        return PoEConfig(**{name: getattr(self, name) for name in _POE_FIELDS})
