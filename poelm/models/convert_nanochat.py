"""Convert a nanochat `base_train` checkpoint into a poelm base model directory.

The invariant: a conversion reproduces the nanochat model exactly (its logits; one PoE stage in `none`
mode, as it was trained end to end) or does not happen. What an older checkpoint lacks is filled by a
named migration, logged and recorded in config.json (`converted_from.migrations`); anything else that
does not fit is an error naming the file and the field or tensor. Nothing is unpickled but tensors
(`torch.load(weights_only=True)`) and, for `tokenizer.pkl`, a restricted unpickler that runs no
tiktoken code. The files and the migrations: docs/formats.md, "nanochat checkpoints".
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..core.files import read_json
from ..core.config import SIZE_LIMITS, check_size, PoEConfig
from ..core.errors import PoelmError
from ..core.model import PoEGPT
from ..core.cascade import check_state_dict
from .directory import save_model_dir
from ..common.atomic import check_output
from ..core.tokenizer import SPECIAL_TOKENS, Tokenizer

log = logging.getLogger("poelm.convert")

# GPTConfig fields nanochat has written over its versions; anything else is refused.
NANOCHAT_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"}
IGNORED_FIELDS = {"mtp_n": 1}  # fields that are harmless at their default value


def find_step(checkpoint_dir: Path, step: int | None) -> int:
    """The requested step, or the latest `model_NNNNNN.pt` present."""
    if not checkpoint_dir.is_dir():
        raise PoelmError(f"{checkpoint_dir}: not a directory (expected a nanochat checkpoint folder)")
    steps = sorted(int(m.group(1)) for p in checkpoint_dir.iterdir()
                   if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))
    if not steps:
        raise PoelmError(f"{checkpoint_dir}: no model_NNNNNN.pt checkpoint found")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise PoelmError(f"{checkpoint_dir}: no checkpoint for step {step} (present: {', '.join(map(str, steps))})")
    return step


def _load(path: Path) -> Any:
    """torch.load, tensors only; mapped rather than read where the file's format allows (zip, torch >= 1.6)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = _load(path)
    except pickle.UnpicklingError as e:
        raise PoelmError(f"{path}: refused by torch.load(weights_only=True): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise PoelmError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PoelmError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def read_meta(path: Path) -> dict:
    """A checkpoint's meta JSON, its model_config's sizes checked (types and poelm's bounds) before
    anything is built or read from them."""
    if not path.is_file():
        raise PoelmError(f"{path}: missing (nanochat writes it beside model_NNNNNN.pt)")
    meta = read_json(path, verify=False)  # nanochat's file: no digests to check against
    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise PoelmError(f"{path}: no 'model_config' object")
    for name in SIZE_LIMITS:
        if name in mc:
            check_size(name, mc[name], f"{path}: model_config")
    if not isinstance(mc.get("window_pattern", ""), str):
        raise PoelmError(f"{path}: model_config 'window_pattern' = {mc['window_pattern']!r}: expected a string of "
                         f"'S' and 'L'")
    return meta


def config_from_nanochat(model_config: dict, state: dict[str, torch.Tensor], meta_path: Path,
                         migrations: list[str]) -> PoEConfig:
    """A PoEConfig reproducing the checkpoint, with a named migration for every missing part."""
    unknown = [k for k in model_config if k not in NANOCHAT_FIELDS
               and not (k in IGNORED_FIELDS and model_config[k] == IGNORED_FIELDS[k])]
    if unknown:
        raise PoelmError(f"{meta_path}: model_config field(s) poelm cannot reproduce: {', '.join(sorted(unknown))}")
    fields = nanochat_fields(model_config, state, meta_path, migrations)
    fields.update(poe_stage_layers=[fields["n_layer"]], poe_mode="none")
    try:
        return PoEConfig(**fields)
    except PoelmError as e:
        raise PoelmError(f"{meta_path}: {e}") from None


def nanochat_fields(model_config: dict, state: dict[str, torch.Tensor], meta_path: Path,
                    migrations: list[str]) -> dict[str, Any]:
    """PoEConfig fields for nanochat's GPTConfig fields and what the state dict holds, with a named
    migration for every missing part (the fork's bases share this architecture)."""
    missing = sorted({"vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "sequence_len"} - set(model_config))
    if missing:
        raise PoelmError(f"{meta_path}: model_config lacks {', '.join(missing)}")
    fields = {k: model_config[k] for k in NANOCHAT_FIELDS if k in model_config}
    if "window_pattern" not in fields:
        migrations.append("no_sliding_window: window_pattern 'L' (every layer attends to the full context)")
        fields["window_pattern"] = "L"
    n_layer = fields["n_layer"]
    if "smear_gate.weight" not in state and "smear_lambda" not in state:
        migrations.append("no_smear: the smear switch is off")
        fields["smear"] = False
    if "backout_lambda" not in state:
        migrations.append("no_backout: the backout switch is off")
        fields["backout"] = False
    ve_layers = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"value_embeds\.(\d+)\.weight", k)))
    if not ve_layers:
        migrations.append("no_value_embeds: no layer carries value embeddings")
    fields["value_embed_layers"] = ve_layers
    if "resid_lambdas" not in state and "x0_lambdas" not in state:
        migrations.append("no_residual_lambdas: resid_lambdas = 1, x0_lambdas = 0 (the plain residual)")
        state["resid_lambdas"] = torch.ones(n_layer)
        state["x0_lambdas"] = torch.zeros(n_layer)
    return fields


def find_tokenizer(checkpoint_dir: Path, tokenizer_dir: str | None) -> Tokenizer:
    """--tokenizer, or nanochat's own places: beside the checkpoint, or base_dir/tokenizer."""
    if tokenizer_dir is not None:
        candidates = [Path(tokenizer_dir)]
    else:
        candidates = [checkpoint_dir, checkpoint_dir.parent.parent / "tokenizer", checkpoint_dir.parent / "tokenizer"]
    for d in candidates:
        if (d / "poelm_tokenizer.json").is_file():
            return Tokenizer.load(d)
        if (d / "tokenizer.pkl").is_file():
            return load_nanochat_tokenizer(d / "tokenizer.pkl")
    where = ", ".join(str(d) for d in candidates)
    raise PoelmError(f"no tokenizer (tokenizer.pkl or poelm_tokenizer.json) in {where}; pass --tokenizer DIR")


def convert_nanochat(checkpoint: str | Path, out: str | Path, step: int | None = None,
                     tokenizer: str | None = None, overwrite: bool = False,
                     dtype: str = "float32") -> tuple[Path, list[str]]:
    """Write a poelm base directory from a nanochat checkpoint, its tensors stored in `dtype`; returns it
    and the migrations applied. `out` may not overlap the checkpoint folder or the tokenizer folder."""
    checkpoint = Path(checkpoint)
    inputs = [("checkpoint", checkpoint)] + ([("tokenizer", tokenizer)] if tokenizer is not None else [])
    check_output(out, inputs, overwrite)
    step = find_step(checkpoint, step)
    model_path = checkpoint / f"model_{step:06d}.pt"
    meta_path = checkpoint / f"meta_{step:06d}.json"
    meta = read_meta(meta_path)
    state = read_state_dict(model_path)
    migrations: list[str] = []
    config = config_from_nanochat(meta["model_config"], state, meta_path, migrations)
    for m in migrations:
        log.info("migration %s", m)
    with torch.device("meta"):
        model = PoEGPT(config)
    check_state_dict(model.state_dict(), state, str(model_path))
    # Assigned as mapped, in the checkpoint's dtype: save_model_dir converts one tensor at a time, so a
    # bfloat16 checkpoint is never held whole in float32 (nor a float32 one in bfloat16).
    model.load_state_dict(state, strict=True, assign=True)
    tok = find_tokenizer(checkpoint, tokenizer)
    if tok.vocab_size != config.vocab_size:
        raise PoelmError(f"tokenizer has {tok.vocab_size} tokens but {meta_path} says vocab_size {config.vocab_size}")
    extra = {"converted_from": {"format": "nanochat", "checkpoint": str(model_path.resolve()), "step": step,
                                "migrations": migrations}}
    return (save_model_dir(model, out, tok, dtype=dtype, overwrite=overwrite, extra_config=extra, inputs=inputs),
            migrations)


# ---- nanochat import -----------------------------------------------------------------------------


class _EncodingState:
    """Stands in for `tiktoken.Encoding` while unpickling: keeps the state, executes nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstructor(cls: Any, base: Any, state: Any) -> _EncodingState:
    # Pickle protocols 0-1 build objects with copyreg._reconstructor(cls, object, None).
    if cls is not _EncodingState or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor used for something other than a tiktoken Encoding")
    return object.__new__(_EncodingState)


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: str = "strict") -> bytes:
    # Pickle protocols 0-2 store bytes as _codecs.encode(str, "latin1"); allow exactly that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


# (module, name) -> harmless stand-in; both spellings of the renamed Python 2 modules appear in
# protocol 0-2 pickles, and a subclass's find_class sees them before any renaming.
_ALLOWED_GLOBALS = {
    ("tiktoken.core", "Encoding"): _EncodingState,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("_codecs", "encode"): _latin1_encode,
}


class _TiktokenUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise PoelmError(
                f"{self.path}: refused to load global '{module}.{name}'; a nanochat tokenizer.pkl holds only a "
                f"tiktoken Encoding, so this file is not one (and may be malicious)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise PoelmError(f"{self.path}: refused a persistent id in the pickle; expected a tiktoken Encoding")


def load_nanochat_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Import nanochat's tokenizer (`tokenizer.pkl`, a pickled tiktoken.Encoding; or the directory
    holding it) without running any code from the file. Special ids must already follow the merges
    in poelm's order, which is nanochat's."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.pkl")
    try:
        with open(path, "rb") as f:
            obj = _TiktokenUnpickler(f, path).load()
    except FileNotFoundError:
        raise PoelmError(f"{path}: file not found; expected nanochat's tokenizer.pkl") from None
    except PoelmError:
        raise
    except Exception as e:  # truncated or corrupt pickle, a stand-in's refusal
        raise PoelmError(f"{path}: not a pickled tiktoken Encoding ({type(e).__name__}: {e})") from None
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise PoelmError(f"{path}: the pickle holds {type(obj).__name__}; expected a tiktoken Encoding")
    state = obj.state
    if isinstance(state, str):
        raise PoelmError(
            f"{path}: pickles tiktoken's registered encoding {state!r} by name; expected a nanochat-trained "
            f"Encoding with its own ranks"
        )
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise PoelmError(f"{path}: Encoding state lacks pat_str/mergeable_ranks/special_tokens")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not isinstance(ranks, dict) or not isinstance(specials, dict):
        raise PoelmError(f"{path}: Encoding mergeable_ranks and special_tokens must be dicts")
    expected = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        detail = ", ".join(f"{t}={specials.get(t)}" for t in SPECIAL_TOKENS)
        raise PoelmError(
            f"{path}: special tokens are {{{detail}}} (+ {sorted(set(specials) - set(expected))}); poelm needs "
            f"exactly {list(SPECIAL_TOKENS)} at ids {len(ranks)}..{len(ranks) + len(SPECIAL_TOKENS) - 1}, right "
            f"after the {len(ranks)} merges, so model embeddings trained with nanochat keep their rows"
        )
    pattern = state["pat_str"]
    try:
        return Tokenizer(ranks, pattern=pattern, name=str(state.get("name", "poelm")))
    except PoelmError as e:
        raise PoelmError(f"{path}: {e}") from None
