"""Hugging Face configuration for poelm models (remote code; ships in every model directory).

Design choices:
- A thin wrapper: every poelm field lives in `PoEConfig` (config.py, shipped beside this file) and
  is validated there; this class only carries the fields as attributes so `transformers` can save,
  load and inspect them, and hands a `PoEConfig` to the model.
- `attribute_map` gives the standard names `transformers` looks for (`num_hidden_layers` is what
  `DynamicCache(config=...)` needs inside `generate()`).
- No `AutoTokenizer` entry here: it belongs in tokenizer_config.json (docs/transformers.md).
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
