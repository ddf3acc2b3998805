"""Model directories: write and read the Hugging Face style folder every poelm model lives in.

Design choices (FORMATS.md):
- A directory holds `config.json` (every PoEConfig field plus the `transformers` keys), weights in
  `model.safetensors` under nanochat's names, the tokenizer files, the remote-code files copied
  verbatim from this package (the same model.py that poelm trains with), `generation_config.json`
  and a generated `README.md` model card.
- Writing is atomic (outputs.AtomicDir): everything goes to a temporary sibling folder that is
  renamed into place at the end, so a failure never leaves a half-written model. An existing target
  is replaced only when the caller asks (`overwrite=True`), and then only once the new folder is
  complete. The last file written is `digests.json` (files.py): the size and digest of every file
  and the model's content fingerprint, which every later read checks.
- Reading is strict and pickle-free: every file is checked against the digests, and unknown config
  fields, missing or unexpected tensors and shape or dtype mismatches are errors that name the file
  and the tensor; a tokenizer whose vocabulary does not match the config is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .card import model_card
from .core.cascade import CONFIG, DTYPES, WEIGHTS, fingerprint_tensors, load_chain, load_safetensors
from .core.config import PoEConfig
from .core.files import read_json, write_json, write_manifest
from .core.errors import PoelmError
from .core.model import PoEGPT
from .outputs import AtomicDir, Inputs
from .core.tokenizer import Tokenizer
from .tokenizer_files import write_hf_tokenizer_files

SHIPPED_DIR = Path(__file__).resolve().parent / "core"
WEIGHTS_NAME = WEIGHTS
CONFIG_NAME = CONFIG


def shipped_code_files() -> list[Path]:
    """The files every directory ships: all of `poelm/core` but its `__init__.py`."""
    return sorted(p for p in SHIPPED_DIR.glob("*.py") if p.name != "__init__.py")


def copy_shipped_code(directory: str | os.PathLike) -> None:
    """Copy the shipped code into a directory, as it is (transformers imports it from there)."""
    for path in shipped_code_files():
        shutil.copyfile(path, Path(directory) / path.name)


# --------------------------------------------------------------------------------------- writing
def hf_config_dict(config: PoEConfig, tokenizer: Tokenizer | None, dtype: str = "float32",
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json: the poelm fields plus what `transformers` needs to find the remote code."""
    data: dict[str, Any] = {
        "model_type": "poelm",
        "architectures": ["PoelmForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_poelm.PoelmConfig",
            "AutoModelForCausalLM": "modeling_poelm.PoelmForCausalLM",
        },
        "dtype": dtype,
        "tie_word_embeddings": False,
    }
    if tokenizer is not None:
        data["bos_token_id"] = tokenizer.bos_id
        data["eos_token_id"] = tokenizer.token_id("<|assistant_end|>")
    data.update(config.to_dict())
    data.update(extra or {})
    return data


def save_model_dir(model: PoEGPT, out: str | os.PathLike, tokenizer: Tokenizer, *,
                   card: str | None = None, dtype: str = "float32", overwrite: bool = False,
                   extra_config: dict[str, Any] | None = None, inputs: Inputs = ()) -> Path:
    """Write a complete, self-contained base model directory (FORMATS.md) atomically; `out` must not
    overlap `inputs` (outputs.check_output)."""
    config = model.config
    if tokenizer.vocab_size != config.vocab_size:
        raise PoelmError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {config.vocab_size}")
    if dtype not in DTYPES:
        raise PoelmError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    with AtomicDir(out, overwrite, inputs) as tmp:
        tensors = {k: v.detach().to("cpu", DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, hf_config_dict(config, tokenizer, dtype, extra_config))
        write_json(tmp / "generation_config.json", {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": [tokenizer.token_id("<|assistant_end|>"), tokenizer.bos_id],
            "pad_token_id": tokenizer.token_id("<|assistant_end|>"),  # = eos, as the tokenizer: no BOS ever masked
        })
        write_hf_tokenizer_files(tmp, tokenizer)
        copy_shipped_code(tmp)
        (tmp / "README.md").write_text(card if card is not None else model_card(model, tmp.name), encoding="utf-8")
        write_manifest(tmp, fingerprint=fingerprint_tensors(tensors))
    return Path(out)


# --------------------------------------------------------------------------------------- reading
def read_config(directory: str | os.PathLike) -> PoEConfig:
    """The directory's own config.json (checked against its digests), as a PoEConfig."""
    if not Path(directory).is_dir():
        raise PoelmError(f"{directory}: not a directory (expected a poelm model directory)")
    path = Path(directory) / CONFIG_NAME
    return PoEConfig.from_dict(read_json(path), source=str(path))


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, verify: bool = True) -> PoEGPT:
    """The model of any base or stage directory (a stage brings its whole chain), loaded strictly and
    with every file of the chain checked against its digests (`verify=False` skips only that)."""
    read_config(directory)  # the directory's own config first: its errors name it
    return load_chain(directory, device=device, dtype=dtype, verify=verify)


def record_digests(directory: str | os.PathLike) -> dict[str, Any]:
    """Re-record `digests.json` from the directory's files as they are now: after a deliberate edit, or
    for a directory written before poelm recorded digests. A stage's fingerprint chains its parent's,
    so the parent's chain is loaded (and verified) for it."""
    from .core.cascade import DELTA, assemble, locate, resolve_chain

    directory = Path(directory)
    if not directory.is_dir():
        raise PoelmError(f"{directory}: not a directory")
    fingerprint = None
    if (directory / CONFIG_NAME).is_file():
        data = read_json(directory / CONFIG_NAME, verify=False)
        if data.get("base_model_name_or_path") is not None:
            parent = locate(str(data["base_model_name_or_path"]), directory)
            parent_print = assemble(resolve_chain(parent))[2][-1]
            fingerprint = fingerprint_tensors(load_safetensors(directory / DELTA, verify=False), parent_print)
        else:
            fingerprint = fingerprint_tensors(load_safetensors(directory / WEIGHTS_NAME, verify=False))
    return write_manifest(directory, fingerprint=fingerprint)


def load_tokenizer(directory: str | os.PathLike, config: PoEConfig | None = None) -> Tokenizer:
    """The directory's tokenizer, checked against the model's vocabulary when a config is given."""
    tok = Tokenizer.load(directory)
    if config is not None and tok.vocab_size != config.vocab_size:
        raise PoelmError(f"{directory}: tokenizer has {tok.vocab_size} tokens but config.json says "
                         f"vocab_size {config.vocab_size}")
    return tok
