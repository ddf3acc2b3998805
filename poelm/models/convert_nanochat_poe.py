"""Convert the paper's fork ("nanochat-poe"): PoE bases from its `base_train` and specialist stages from
its specialist SFT script, into poelm directories with the fork's logits.

The invariant: a converted base or stage gives the fork's logits (a base read by its Log-OP differs by
one constant per position: the fork does not renormalise), and whatever poelm cannot represent is one
line naming the file and the field or tensor, before anything is written. The fork's files are read
through convert_nanochat's readers; its PoE settings come from `user_config`, never from
`model_config.poe_every`; a stage is converted onto an explicit `--parent`, whose fingerprint poelm
computes, and the parent entries the fork's training let drift become declared `parent_overrides`
(core/cascade.py), never dropped. The facts this rests on: docs/formats.md, "nanochat-poe checkpoints".
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from .convert_nanochat import NANOCHAT_FIELDS, find_step, find_tokenizer, nanochat_fields, read_meta, read_state_dict
from ..core.cascade import check_state_dict
from ..core.config import SIZE_LIMITS, PoEConfig, windows_from_pattern
from ..core.errors import PoelmError
from ..core.files import CONFIG, read_json
from ..core.model import PoEGPT, block_shapes, from_disk, to_disk
from .directory import open as open_directory, save_model_dir
from ..common.atomic import chain_inputs, check_output

log = logging.getLogger("poelm.convert")

# model_config fields of the fork's GPTConfig versions, with the value each has when absent.
FORK_FIELDS = {"dual_head": False, "frozen_layers": 0, "per_stage_head": False, "poe_every": 1,
               "intermediate_size": 0}
FORK_MODES = {"none": "none", "flat": "flat", "hier": "flat"}  # the fork's poe_mode -> poelm's


def fork_stage_layers(n_layer: int, every: int) -> list[int]:
    """Stage sizes: stage k ends at layer i when (i + 1) % every == 0 or i == n_layer - 1."""
    ends = [i for i in range(n_layer) if (i + 1) % every == 0 or i == n_layer - 1]
    return [b - a for a, b in zip([-1] + ends[:-1], ends)]


def _read(checkpoint: Path, step: int | None) -> tuple[Path, Path, dict, dict[str, torch.Tensor]]:
    step = find_step(checkpoint, step)
    model_path, meta_path = checkpoint / f"model_{step:06d}.pt", checkpoint / f"meta_{step:06d}.json"
    meta = read_meta(meta_path)
    return model_path, meta_path, meta, read_state_dict(model_path)


def _model_config(meta: dict, meta_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nanochat's GPT fields, the fork's own fields with their defaults), unknown fields refused."""
    mc = meta["model_config"]
    unknown = sorted(k for k in mc if k not in NANOCHAT_FIELDS and k not in FORK_FIELDS)
    if unknown:
        raise PoelmError(f"{meta_path}: model_config field {unknown[0]!r} is not one poelm can reproduce "
                         f"(known: {sorted(NANOCHAT_FIELDS | set(FORK_FIELDS))})")
    fork = {k: mc.get(k, default) for k, default in FORK_FIELDS.items()}
    for key, most in (("frozen_layers", SIZE_LIMITS["n_layer"]), ("poe_every", SIZE_LIMITS["n_layer"]),
                      ("intermediate_size", 4 * SIZE_LIMITS["n_embd"])):
        value = fork[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most):
            raise PoelmError(f"{meta_path}: model_config '{key}' = {value!r}: expected an integer in [0, {most}]")
    size = fork["intermediate_size"]
    if size not in (0, None) and size != 4 * mc.get("n_embd", 0):
        raise PoelmError(f"{meta_path}: model_config intermediate_size {size}: poelm's MLP is 4 x n_embd "
                         f"= {4 * mc.get('n_embd', 0)}")
    return {k: v for k, v in mc.items() if k in NANOCHAT_FIELDS}, fork


def _user(meta: dict, key: str, default: Any, kind: type, meta_path: Path) -> Any:
    value = (meta.get("user_config") or {}).get(key, default)
    if value is None:
        value = default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise PoelmError(f"{meta_path}: user_config {key} is {value!r}; expected {kind.__name__}")
    return value


def convert_nanochat_poe(checkpoint: str | Path, out: str | Path, step: int | None = None,
                         tokenizer: str | None = None, overwrite: bool = False,
                         dtype: str = "float32") -> tuple[Path, list[str]]:
    """Write a poelm base directory from a fork `base_train` checkpoint, its tensors stored in `dtype`;
    returns it and the notes (migrations and mappings) recorded in config.json `converted_from`."""
    checkpoint = Path(checkpoint)
    inputs = [("checkpoint", checkpoint)] + ([("tokenizer", tokenizer)] if tokenizer is not None else [])
    check_output(out, inputs, overwrite)
    model_path, meta_path, meta, state = _read(checkpoint, step)
    upstream, fork = _model_config(meta, meta_path)
    if fork["dual_head"] or fork["frozen_layers"]:
        raise PoelmError(f"{meta_path}: model_config dual_head/frozen_layers: a specialist stage checkpoint; convert "
                         f"it with `poelm convert nanochat-poe-stage --parent MODELDIR`")
    mode = _user(meta, "poe_mode", "none", str, meta_path)
    if mode not in FORK_MODES:
        raise PoelmError(f"{meta_path}: user_config poe_mode {mode!r}; expected one of {sorted(FORK_MODES)}")
    every = _user(meta, "poe_every", 1, int, meta_path)
    if not 1 <= every <= SIZE_LIMITS["n_layer"]:
        raise PoelmError(f"{meta_path}: user_config 'poe_every' = {every}: expected an integer in "
                         f"[1, {SIZE_LIMITS['n_layer']}]")
    alpha = _user(meta, "poe_alpha", 0.0, float, meta_path)
    heads = _user(meta, "per_stage_head", bool(fork["per_stage_head"]), bool, meta_path)
    notes: list[str] = []
    fields = nanochat_fields(upstream, state, meta_path, notes)
    sizes = fork_stage_layers(fields["n_layer"], every)
    fields.update(poe_stage_layers=sizes, poe_mode=FORK_MODES[mode], poe_alpha=alpha, poe_stage_heads=heads,
                  poe_output="logop" if heads else "last", poe_backout_stages=[] if heads else [len(sizes) - 1])
    if mode == "hier":
        notes.append("hier: poe_mode flat (the fork's hier is flat's losses without the detach; poelm has no such "
                     "training mode, and inference is the same)")
    try:
        config = PoEConfig(**fields)
    except PoelmError as e:
        raise PoelmError(f"{meta_path}: {e}") from None
    for n in notes:
        log.info("nanochat-poe: %s", n)
    with torch.device("meta"):
        model = PoEGPT(config)
    check_state_dict(to_disk(model.state_dict()), state, str(model_path))
    model.load_state_dict(from_disk({k: v.float() for k, v in state.items()}), strict=True, assign=True)
    tok = find_tokenizer(checkpoint, tokenizer)
    if tok.vocab_size != config.vocab_size:
        raise PoelmError(f"tokenizer has {tok.vocab_size} tokens but {meta_path} says vocab_size {config.vocab_size}")
    extra = {"converted_from": {"format": "nanochat-poe", "checkpoint": str(model_path.resolve()),
                                "step": meta.get("step"), "poe_mode": mode, "poe_every": every, "poe_alpha": alpha,
                                "per_stage_head": heads, "notes": notes}}
    return save_model_dir(model, out, tok, dtype=dtype, overwrite=overwrite, extra_config=extra, inputs=inputs), notes


def convert_nanochat_poe_stage(checkpoint: str | Path, parent: str | Path, out: str | Path, step: int | None = None,
                               name: str | None = None, overwrite: bool = False,
                               dtype: str | None = None) -> tuple[Path, dict[str, list[int]]]:
    """Write a poelm stage directory on `parent` (a converted base, or a converted stage for chains)
    from a fork specialist delta, stored in `dtype` (default: the parent's); returns it and the parent
    entries it overrides."""
    from .specialist import grow, save_specialist

    checkpoint = Path(checkpoint)
    chain = open_directory(parent)  # every file of the parent's chain verified
    inputs = [("checkpoint", checkpoint)] + chain_inputs(chain, "parent")
    check_output(out, inputs, overwrite)
    model_path, meta_path, meta, delta = _read(checkpoint, step)
    upstream, fork = _model_config(meta, meta_path)
    pc = chain.config
    if not (meta.get("dual_head", fork["dual_head"])):
        raise PoelmError(f"{meta_path}: dual_head is false: without --dual-head the fork saves the whole model, not "
                         f"a stage delta; poelm converts --dual-head stages")
    frozen = meta.get("frozen_layers", fork["frozen_layers"])
    if frozen != pc.n_layer or isinstance(frozen, bool):
        raise PoelmError(f"{meta_path}: frozen_layers {frozen}, but the parent {chain.path} has {pc.n_layer} layers: "
                         f"not the parent this stage was trained on")
    for key in ("vocab_size", "n_head", "n_kv_head", "n_embd", "sequence_len"):
        if key in upstream and upstream[key] != getattr(pc, key):
            raise PoelmError(f"{meta_path}: model_config {key} {upstream[key]}, the parent has {getattr(pc, key)}")
    if pc.poe_stage_heads:
        raise PoelmError(f"{meta_path}: a stage on a base with per-stage heads ({chain.path}); the fork's specialist "
                         f"forward drops them and poelm's stages keep them: not representable")
    n_layer = upstream.get("n_layer")
    if not isinstance(n_layer, int) or n_layer <= pc.n_layer:
        raise PoelmError(f"{meta_path}: model_config n_layer {n_layer!r}; expected more than the parent's {pc.n_layer}")
    d, V = pc.n_embd, pc.padded_vocab_size
    expected = {f"transformer.h.{i}.{k}": s for i in range(pc.n_layer, n_layer) for k, s in block_shapes(pc).items()}
    expected.update({"lm_head_stage.weight": (V, d), "transformer.wte.weight": (V, d), "resid_lambdas": (n_layer,),
                     "x0_lambdas": (n_layer,)})
    check_state_dict(expected, delta, str(model_path))
    grown = grow(chain.model(), n_layer - pc.n_layer)  # the parent's tensors, its head folded, new blocks
    windows = windows_from_pattern(upstream.get("window_pattern", "L"), n_layer, pc.sequence_len)
    with torch.device("meta"):
        model = PoEGPT(dataclasses.replace(grown.config, layer_windows=windows))  # the fork's rule for the total depth
    state = to_disk(grown.state_dict())
    state.update({k: v.float() for k, v in delta.items()})  # float32 whatever the parent; compared in its dtype
    model.load_state_dict(from_disk(state), strict=True, assign=True)  # grown's tensors, not copied again
    name = name or (meta.get("user_config") or {}).get("output_tag") or checkpoint.name
    extra = {"converted_from": {"format": "nanochat-poe-stage", "checkpoint": str(model_path.resolve()),
                                "step": meta.get("step"), "base_model_dir": meta.get("base_model_dir"),
                                "frozen_layers": frozen}}
    path = save_specialist(model, chain, out, name, overwrite=overwrite, extra_config=extra,
                           allow_parent_overrides=True, dtype=dtype)
    return path, read_json(Path(path) / CONFIG).get("parent_overrides") or {}
