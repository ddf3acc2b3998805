"""Model directories: write and read the Hugging Face style folder every poelm model lives in.

Design choices (FORMATS.md):
- A directory holds `config.json` (every PoEConfig field plus the `transformers` keys), weights in
  `model.safetensors` under nanochat's names, the tokenizer files, the remote-code files copied
  verbatim from this package (the same model.py that poelm trains with), `generation_config.json`
  and a generated `README.md` model card.
- Writing is atomic: everything goes to a temporary sibling folder that is renamed into place at the
  end, so a failure never leaves a half-written model. An existing target is replaced only when the
  caller asks (`overwrite=True`), and then only after the new folder is complete.
- Reading is strict and pickle-free: unknown config fields, missing or unexpected tensors and shape
  or dtype mismatches are errors that name the file and the tensor; a tokenizer whose vocabulary
  does not match the config is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .card import model_card
from .cascade import check_state_dict, load_chain, load_safetensors  # noqa: F401 (re-exported)
from .config import PoEConfig
from .errors import PoelmError
from .model import PoEGPT
from .tokenizer import Tokenizer
from .tokenizer_files import TOKENIZER_CODE_FILES, write_hf_tokenizer_files

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CODE_FILES = ("configuration_poelm.py", "modeling_poelm.py", "config.py", "model.py", "cascade.py",
                    "errors.py")
REMOTE_CODE_FILES = tuple(dict.fromkeys(MODEL_CODE_FILES + tuple(TOKENIZER_CODE_FILES)))
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def write_json(path: str | os.PathLike, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing output before any work is done (AtomicDir checks again at the end)."""
    if Path(out).exists() and not overwrite:
        raise PoelmError(f"{out}: already exists (choose another --out, or pass --overwrite)")


class AtomicDir:
    """Build a directory under a temporary name, then rename it into place on success.

    Usage: `with AtomicDir(out, overwrite) as tmp: ...write into tmp...`. On an exception the
    temporary folder is removed and `out` is untouched.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_out(self.out, self.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.tmp.chmod(0o755)
        if self.out.exists():  # replace only now that the new folder is complete
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "x")
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)


def save_model_dir(model: PoEGPT, out: str | os.PathLike, tokenizer: Tokenizer, *,
                   card: str | None = None, dtype: str = "float32", overwrite: bool = False,
                   extra_config: dict[str, Any] | None = None) -> Path:
    """Write a complete, self-contained base model directory (FORMATS.md) atomically."""
    config = model.config
    if tokenizer.vocab_size != config.vocab_size:
        raise PoelmError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {config.vocab_size}")
    if dtype not in DTYPES:
        raise PoelmError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    with AtomicDir(out, overwrite) as tmp:
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
        for name in MODEL_CODE_FILES:
            shutil.copyfile(PACKAGE_DIR / name, tmp / name)
        (tmp / "README.md").write_text(card if card is not None else model_card(model, tmp.name), encoding="utf-8")
    return Path(out)


# --------------------------------------------------------------------------------------- reading
def read_config(directory: str | os.PathLike) -> PoEConfig:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise PoelmError(f"{directory}: not a directory (expected a poelm model directory)")
    if not path.is_file():
        raise PoelmError(f"{path}: missing (a poelm model directory has a config.json)")
    return PoEConfig.from_json_file(path)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> PoEGPT:
    """The model of any base or stage directory (a stage brings its whole chain), loaded strictly."""
    read_config(directory)  # the directory's own config first: its errors name it
    return load_chain(directory, device=device, dtype=dtype)


def load_tokenizer(directory: str | os.PathLike, config: PoEConfig | None = None) -> Tokenizer:
    """The directory's tokenizer, checked against the model's vocabulary when a config is given."""
    tok = Tokenizer.load(directory)
    if config is not None and tok.vocab_size != config.vocab_size:
        raise PoelmError(f"{directory}: tokenizer has {tok.vocab_size} tokens but config.json says "
                         f"vocab_size {config.vocab_size}")
    return tok
