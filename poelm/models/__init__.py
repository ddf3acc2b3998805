"""Model directories: writing and opening them, their cards, specialists, conversions.

`poelm.models.open(directory) -> Chain` is the one way to open a model directory (base or stage):
`.model(device, dtype)`, `.tokenizer()`, `.config`, `.path`, `.links`, `.fingerprint`. Users of
transformers read the same directories with `from_pretrained`, through the same shipped cascade loader
(core/cascade.py). docs/architecture.md says why there is one way, and what became of the others.
"""

from .directory import open  # noqa: A001

__all__ = ["open"]
