"""The models a server serves: a base and its specialists, the base's tensors held once
(docs/serving.md, "The models").

- Every directory must descend from the same root base (checked by the root fingerprint).
- Model ids: `--name`, else a stage's `stage_name`, else the directory's name; unique.
- A parameter equal to one an earlier model holds is replaced by that tensor: N specialists cost the
  base once (serving never trains, so shared storage is never written). The directories are opened
  with one `mapped` record (core/cascade.py), so a file they share is mapped and verified once and
  their models hold the very same tensors (compared by identity, not by reading them); a specialist
  adds its delta's bytes, and transiently its own copy of the embedding table while its changed rows
  are found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .. import models
from ..core.cascade import DTYPES, Mapped
from ..core.errors import PoelmError
from ..core.model import PoEGPT
from ..core.tokenizer import Tokenizer
from ..infer.fleet import share_parameters


@dataclass
class ServedModel:
    """One model id: its model, tokenizer, directory and root fingerprint."""

    name: str
    directory: Path
    model: PoEGPT
    tokenizer: Tokenizer
    root: str
    decoders: dict = field(default_factory=dict)  # the scheduler's decoders, by decode mode

    @cached_property
    def longest_token(self) -> int:
        """The most UTF-8 bytes one token stands for (a text longer than the context times this cannot fit)."""
        return max(self.tokenizer.token_bytes)


def load_served(directories: list[str | os.PathLike], names: list[str] | None = None,
                device: str | torch.device = "cpu", dtype: str | None = None) -> dict[str, ServedModel]:
    """Load every directory (bases and stages, checked link by link) under its model id, in `dtype`
    (default: the stored one)."""
    if not directories:
        raise PoelmError("serve: give at least one model directory")
    if names is not None and len(names) > len(directories):
        raise PoelmError(f"--name given {len(names)} times for {len(directories)} directories")
    served: dict[str, ServedModel] = {}
    held: dict[str, torch.Tensor] = {}
    mapped: Mapped = {}
    for i, directory in enumerate(directories):
        chain = models.open(directory, mapped=mapped)
        name = (names[i] if names and i < len(names) else
                chain.links[-1].data.get("stage_name") or Path(directory).resolve().name)
        if name in served:
            raise PoelmError(f"{directory}: model id {name!r} is already taken by {served[name].directory} "
                             f"(give --name for each directory)")
        first = next(iter(served.values()), None)
        if first is not None and chain.fingerprints[0] != first.root:
            raise PoelmError(f"{directory}: its root base (fingerprint {chain.fingerprints[0]}) is not the root "
                             f"base of {first.directory} ({first.root}); one server serves one base")
        model = chain.model(device, DTYPES[dtype] if dtype else None)
        share_parameters(model, held)
        served[name] = ServedModel(name, Path(directory), model, chain.tokenizer(), chain.fingerprints[0])
    return served
