"""Specialists: attach new blocks and a zero-initialised head to a frozen parent, and ship the result
as a delta (docs/model.md §3).

Names: a *stage* is any cut of consecutive layers with a read-out (the base has K of them); a
*specialist* is the stage appended to a frozen parent and trained apart, shipped in a "stage
directory" (the format's word; on the command line, `poelm specialist attach|train`).

The invariant: right after attaching to a base, the assembled model gives the base's logits bit for
bit on every input without chat tokens (the new blocks are the identity, the new head is zero; only
the chat tokens' embedding rows change, warm-initialised once per chain), and the delta holds exactly
what the stage changed, provenance in metadata. How attaching, the chat rows, the delta and the
trainable set are laid out: docs/formats.md, "How a stage is made".

Two ways to attach, one result: `attach` gives the grown model in memory (to train or test it), and
`attach_directory` (`poelm specialist attach`) writes the same delta without building any model: it
makes one new block at a time and reads of the parent only the rows it warm-starts from. A delta is
stored in the parent's dtype unless told otherwise; the parent is compared in its own dtype, so a
stage trained in float32 on a bfloat16 parent keeps that parent bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from .card import model_card, table
from ..core.cascade import (DTYPES, OVERRIDE_PREFIX, ROWS_IDS, ROWS_VALUES, Chain, Link, check_chain, check_extends,
                           expected_delta, resolve_chain)
from ..core.config import PoEConfig, windows_from_pattern
from ..core.errors import PoelmError
from ..core.files import (CONFIG, DELTA, PARENT_FIELD, read_json, read_manifest, replace_value, update_manifest,
                         verify_all, write_text)
from ..core.init_plan import block_plan
from ..core.layers import block_shapes
from ..core.model import PoEGPT, to_disk
from ..core.tensorfile import read_header, stream_tensors
from ..core.tokenizer import Tokenizer
from .directory import hf_config_dict, open as open_directory, storage_dtype, write_directory
from ..common.atomic import AtomicDir, chain_inputs, check_output

# Where each chat token's embedding row is warm-initialised from (docs/model.md §3).
CHAT_ROW_SOURCES = {
    "<|user_start|>": "User", "<|user_end|>": "\n", "<|assistant_start|>": "Assistant",
    "<|assistant_end|>": "\n", "<|python_start|>": "```", "<|python_end|>": "```",
    "<|output_start|>": "Output", "<|output_end|>": "\n",
}


def specialist_config(parent: PoEConfig, n_layers: int) -> PoEConfig:
    """The assembled config: the parent's, plus one stage of `n_layers` blocks."""
    if n_layers < 1:
        raise PoelmError(f"--layers {n_layers}: a stage adds at least one block")
    n = parent.n_layer + n_layers
    new_windows = windows_from_pattern(parent.window_pattern, n, parent.sequence_len)[parent.n_layer:]
    k = parent.n_stages
    return dataclasses.replace(
        parent, n_layer=n, layer_windows=parent.layer_windows + new_windows,
        poe_stage_layers=parent.poe_stage_layers + [n_layers],
        poe_backout_stages=parent.poe_backout_stages + ([k] if parent.backout else []),
        stage_head=True, head_fold=parent.stage_head or parent.head_fold, poe_mode="none")


def chat_rows_done(chain: list[Link]) -> bool:
    return any(link.data.get("chat_rows_initialized") for link in chain)


def warm_rows(wte: torch.Tensor, tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chat token's warm-initialised row: the mean of its source text's rows (ids (n,), rows (n, d)
    in the table's dtype). Reads only the source rows of `wte`."""
    ids = torch.tensor([tok.token_id(name) for name in CHAT_ROW_SOURCES], dtype=torch.int64)
    with torch.no_grad():
        rows = torch.stack([wte[tok.encode(text)].mean(dim=0) for text in CHAT_ROW_SOURCES.values()])
    return ids, rows


@torch.no_grad()
def warm_init_chat_rows(model: PoEGPT, tok: Tokenizer) -> list[int]:
    """Set each chat token's embedding row to the mean row of its source text; returns the ids."""
    wte = model.transformer.wte.weight
    ids, rows = warm_rows(wte, tok)
    wte[ids] = rows
    return ids.tolist()


def _opened(chain: Chain | str | os.PathLike) -> Chain:
    """A chain value as it is; a directory opened (and checked) once (directory.open)."""
    return chain if isinstance(chain, Chain) else open_directory(chain)


def new_block(config: PoEConfig, layer: int, seed: int) -> dict[str, torch.Tensor]:
    """The float32 tensors of block `layer` appended to a parent (no value embedding; names within
    `transformer.h.{layer}.`): nanochat's init (core/init_plan.py) from a generator of its own per
    (seed, layer), so a block depends on neither the parent nor the order blocks are made in."""
    digest = hashlib.blake2b(f"poelm-block|{seed}|{layer}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    shapes, out = block_shapes(config), {}
    with torch.no_grad():
        for name, fill in block_plan(config, has_ve=False):
            out[name] = torch.empty(shapes[name])
            fill(out[name], g)
    return out


@torch.no_grad()
def grow(parent: PoEGPT, n_layers: int, seed: int = 0) -> PoEGPT:
    """The parent model with one stage of `n_layers` new blocks appended (the identity at first: `new_block`)
    and a zero specialist head: every tensor of the parent is copied (the grown model may be trained in
    place), the parent's own specialist head folded into the ancestors' head."""
    pc = parent.config
    config = specialist_config(pc, n_layers)
    state = {k: v.detach().clone() for k, v in parent.state_dict().items()}
    lm = state["lm_head.weight"]
    head, fold = state.pop("specialist_head.weight", None), state.pop("ancestors_head.weight", None)
    if head is not None:  # the parent's head joins the ancestors' fold (the order cascade uses)
        state["ancestors_head.weight"] = head if fold is None else fold + head
    for i in range(pc.n_layer, config.n_layer):
        state.update({f"transformer.h.{i}.{k}": v.to(lm) for k, v in new_block(config, i, seed).items()})
    for name, value in (("resid_lambdas", 1.0), ("x0_lambdas", 0.0)):
        state[name] = torch.cat([state[name], torch.full((n_layers,), value).to(state[name])])
    state["specialist_head.weight"] = torch.zeros_like(lm)
    with torch.device("meta"):
        model = PoEGPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


@torch.no_grad()
def attach(parent: Chain | str | os.PathLike, n_layers: int, seed: int = 0,
           chat_rows: bool = True) -> tuple[PoEGPT, dict[str, Any]]:
    """Append a stage to the parent (a chain, or its directory; `grow`); returns the model and the facts
    `save_specialist` records."""
    chain = _opened(parent)
    model = grow(chain.model(), n_layers, seed)
    initialised: list[int] = []
    if chat_rows and not chat_rows_done(chain.links):
        initialised = warm_init_chat_rows(model, chain.tokenizer())
    return model, {"parent_dir": str(chain.path), "parent_fingerprint": chain.fingerprint,
                   "parent_layers": chain.config.n_layer, "stage_layers": n_layers, "chat_rows": initialised,
                   "chat_rows_initialized": bool(initialised) or chat_rows_done(chain.links)}


def attach_directory(parent: Chain | str | os.PathLike, out: str | os.PathLike, n_layers: int, name: str, *,
                     seed: int = 0, chat_rows: bool = True, dtype: str | None = None,
                     overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """`poelm specialist attach`: the stage directory `save_specialist(*attach(...))` writes, byte for byte
    in its tensors, without building a model: each new block made, written and dropped in turn, the zero
    head and the warm-started rows (read from the parent's table, nothing else of it) held. Stored in
    `dtype` (default: the parent's). Returns the directory and `attach`'s facts."""
    chain = _opened(parent)
    inputs = chain_inputs(chain, "parent")
    check_output(out, inputs, overwrite)
    dtype, tok = storage_dtype(dtype, chain.dtype), chain.tokenizer()
    target, config, P = DTYPES[dtype], specialist_config(chain.config, n_layers), chain.config.n_layer
    done, initialised, rows = chat_rows_done(chain.links), [], {}
    if chat_rows and not done:
        wte = chain.parts.embedding()
        ids, values = warm_rows(wte, tok)
        keep = (values != wte[ids]).any(dim=1)  # a row equal to the parent's is no change (as delta_tensors)
        order = ids[keep].argsort()
        initialised, rows = ids.tolist(), {ROWS_IDS: ids[keep][order], ROWS_VALUES: values[keep][order]}
        rows = rows if keep.any() else {}
    V, d = config.padded_vocab_size, config.n_embd
    plan = {f"transformer.h.{i}.{k}": (target, s) for i in range(P, config.n_layer)
            for k, s in block_shapes(config).items()}
    plan.update({"lm_head_stage.weight": (target, (V, d)), "resid_lambdas": (target, (n_layers,)),
                 "x0_lambdas": (target, (n_layers,))})
    plan.update({k: (v.dtype if k == ROWS_IDS else target, tuple(v.shape)) for k, v in rows.items()})
    blocks: dict[int, dict[str, torch.Tensor]] = {}

    def produce(key: str) -> torch.Tensor:  # in name order: a block's tensors are consecutive
        if key.startswith("transformer.h."):
            layer, rest = key[len("transformer.h."):].split(".", 1)
            if int(layer) not in blocks:
                blocks.clear()
                blocks[int(layer)] = new_block(config, int(layer), seed)
            return blocks[int(layer)].pop(rest)
        fixed = {"lm_head_stage.weight": lambda: torch.zeros(V, d, dtype=target),
                 "resid_lambdas": lambda: torch.ones(n_layers), "x0_lambdas": lambda: torch.zeros(n_layers)}
        return fixed[key]() if key in fixed else rows[key]

    info = {"parent_dir": str(chain.path), "parent_fingerprint": chain.fingerprint, "parent_layers": P,
            "stage_layers": n_layers, "chat_rows": initialised, "chat_rows_initialized": bool(initialised) or done}
    with torch.device("meta"):
        skeleton = PoEGPT(config)  # for the card: shapes and counts only
    fields = _stage_fields(chain, out, name, config, rows.get(ROWS_IDS), info["chat_rows_initialized"], {})
    ordered = [(k, *plan[k]) for k in sorted(plan)]
    with AtomicDir(out, overwrite, inputs) as tmp:
        entry, fingerprint = stream_tensors(tmp / DELTA, ordered, produce,
                                            {"format": "pt", **_stage_metadata(chain, config, name)}, chain.fingerprint)
        write_directory(tmp, tok, config=hf_config_dict(config, tok, dtype, extra=fields),
                        card=specialist_card(skeleton, name, chain.path, _shipped(ordered)),
                        fingerprint=fingerprint, known={DELTA: entry})
    return Path(out), info


def specialist_parameter_names(model: PoEGPT) -> list[str]:
    """Names of the leaf stage's own parameters (blocks and head); its lambdas are entries of
    `resid_lambdas`/`x0_lambdas` from index `config.n_layer - poe_stage_layers[-1]` on."""
    c = model.config
    if not c.stage_head:
        raise PoelmError("this model has no specialist stage (stage_head is false)")
    first = c.n_layer - c.poe_stage_layers[-1]
    names = [f"transformer.h.{i}.{n}" for i in range(first, c.n_layer) for n, _ in
             model.transformer.h[i].named_parameters()]
    return names + ["specialist_head.weight"]


def freeze_for_specialist(model: PoEGPT, train_rows: list[int] | None = None) -> list[str]:
    """Make only the leaf stage trainable; returns the partly frozen parameters (no weight decay!).

    Requires grad: the stage's blocks and `specialist_head`; `resid_lambdas`/`x0_lambdas` with a
    gradient mask that keeps only the stage's layers; with `train_rows`, the embedding with a mask
    that keeps only those rows (the chat tokens). Everything else of the parent is frozen. Run the
    forward with `frozen_layers=config.n_layer - poe_stage_layers[-1]` so the trunk builds no graph;
    training rows needs the backward through the (frozen) trunk instead, so keep `frozen_layers=0`.
    """
    c = model.config
    first = c.n_layer - c.poe_stage_layers[-1]
    own = set(specialist_parameter_names(model))
    partial = ["resid_lambdas", "x0_lambdas"] + (["transformer.wte.weight"] if train_rows else [])
    for name, p in model.named_parameters():
        p.requires_grad_(name in own or name in partial)
    layer_mask = torch.zeros(c.n_layer)
    layer_mask[first:] = 1.0
    for name in ("resid_lambdas", "x0_lambdas"):
        model.get_parameter(name).register_hook(lambda g, m=layer_mask: g * m.to(g.device, g.dtype))
    if train_rows:
        row_mask = torch.zeros(c.padded_vocab_size, 1)
        row_mask[train_rows] = 1.0
        model.transformer.wte.weight.register_hook(lambda g, m=row_mask: g * m.to(g.device, g.dtype))
    return partial


def parent_overrides(model: PoEGPT, parent: PoEGPT) -> dict[str, list[int]]:
    """The parent layers whose lambdas or windows `model` changes: {name: layers} (cascade.OVERRIDABLE)."""
    P = parent.config.n_layer
    state, own = model.state_dict(), parent.state_dict()
    out = {name: (state[name][:P].to(own[name].dtype) != own[name]).nonzero().flatten().tolist()
           for name in ("resid_lambdas", "x0_lambdas")}
    out["layer_windows"] = [i for i, (a, b) in enumerate(zip(parent.config.layer_windows, model.config.layer_windows))
                            if a != b]
    return {k: v for k, v in out.items() if v}


def delta_tensors(model: PoEGPT, parent: PoEGPT, allow_overrides: bool = False,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Exactly what the stage changed against its assembled parent, floating tensors in `dtype` (default:
    the model's). The parent is compared in its own dtype (a model trained in float32 on a bfloat16 parent
    has changed nothing of it). Changed parent lambdas are refused unless `allow_overrides` (a converted
    stage that declares them: cascade.py), then carried whole."""
    P = parent.config.n_layer
    state, own = model.state_dict(), parent.state_dict()
    delta = {name: state[name] for name in specialist_parameter_names(model)}
    delta["resid_lambdas"] = state["resid_lambdas"][P:]
    delta["x0_lambdas"] = state["x0_lambdas"][P:]
    wte, parent_wte = state["transformer.wte.weight"], own["transformer.wte.weight"]
    changed = (wte.to(parent_wte.dtype) != parent_wte).any(dim=1).nonzero().flatten()
    if len(changed):
        delta[ROWS_IDS] = changed.to(torch.int64)
        delta[ROWS_VALUES] = wte[changed]
    # Everything else must be the parent's, or the delta would not reproduce the model.
    for name, value in own.items():
        if name in ("transformer.wte.weight", "resid_lambdas", "x0_lambdas", "specialist_head.weight",
                    "ancestors_head.weight"):
            continue
        if not torch.equal(state[name].to(value.dtype), value):
            raise PoelmError(f"tensor {name!r} of the parent changed: a stage may change only its own blocks, "
                             "lambdas, head and the chat-token embedding rows")
    overrides = parent_overrides(model, parent)
    for name in ("resid_lambdas", "x0_lambdas"):
        if name in overrides and not allow_overrides:
            raise PoelmError(f"the parent's layer lambdas changed ({name} of layers {overrides[name]}): a stage may "
                             "change only its own layers' lambdas")
        if name in overrides:
            delta[OVERRIDE_PREFIX + name] = state[name][:P]
    stored = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t  # noqa: E731
    return {k: stored(v.detach().to("cpu")).contiguous() for k, v in to_disk(delta).items()}  # the file's names


def _stage_fields(chain: Chain, out: str | os.PathLike, name: str, config: PoEConfig, row_ids: torch.Tensor | None,
                  chat_rows_initialized: bool, overrides: dict[str, list[int]]) -> dict[str, Any]:
    """What a stage's config.json records beyond its config: the parent (relative to the stage), the name,
    the parent's fingerprint, the changed rows and the declared overrides."""
    out = Path(out)
    fields = {"base_model_name_or_path": os.path.relpath(chain.path.resolve(), out.resolve().parent / out.name),
              "stage_name": name, "stage_layers": config.poe_stage_layers[-1], "parent_fingerprint": chain.fingerprint,
              "chat_rows": row_ids.tolist() if row_ids is not None else [],
              "chat_rows_initialized": bool(chat_rows_initialized)}
    return {**fields, "parent_overrides": overrides} if overrides else fields


def _stage_metadata(chain: Chain, config: PoEConfig, name: str) -> dict[str, str]:
    """The delta file's safetensors metadata (its provenance)."""
    return {"poelm": "stage-delta/1", "stage_name": name, "parent_fingerprint": chain.fingerprint,
            "parent_layers": str(chain.config.n_layer), "stage_layers": str(config.poe_stage_layers[-1])}


def _shipped(plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[int, int, int, str]:
    """(tensors, parameters, bytes, the floating dtype) of a delta, from its names, dtypes and shapes."""
    floats = [d for _, d, _ in plan if d.is_floating_point]
    return (len(plan), sum(math.prod(s) for _, _, s in plan), sum(math.prod(s) * d.itemsize for _, d, s in plan),
            str(floats[0]).removeprefix("torch.") if floats else "n/a")


def save_specialist(model: PoEGPT, parent: Chain | str | os.PathLike, out: str | os.PathLike, name: str, *,
               overwrite: bool = False, card: str | None = None, extra_config: dict[str, Any] | None = None,
               chat_rows_initialized: bool | None = None, card_kw: dict[str, Any] | None = None,
               allow_parent_overrides: bool = False, dtype: str | None = None) -> Path:
    """Write a stage directory (docs/formats.md) for `model`, a stage on `parent` (a chain, or its
    directory), atomically, its delta stored in `dtype` (default: the parent's); `out` may not overlap
    any directory of the parent's chain. `allow_parent_overrides`: the model may change parent lambdas
    and windows (a converted stage, or one trained from it); they are then declared in
    `parent_overrides` and carried in the delta."""
    chain = _opened(parent)
    inputs = chain_inputs(chain, "parent")
    check_output(out, inputs, overwrite)
    tok, dtype = chain.tokenizer(), storage_dtype(dtype, chain.dtype)
    parent_model, model = chain.model(), model.to("cpu")
    overrides = parent_overrides(model, parent_model) if allow_parent_overrides else {}
    check_extends(chain.config, model.config, f"the model to save as a stage on {chain.path}", overrides)
    delta = delta_tensors(model, parent_model, allow_parent_overrides, DTYPES[dtype])
    del parent_model
    done = chat_rows_done(chain.links) or ROWS_IDS in delta if chat_rows_initialized is None else chat_rows_initialized
    fields = _stage_fields(chain, out, name, model.config, delta.get(ROWS_IDS), done, overrides)
    with AtomicDir(out, overwrite, inputs) as tmp:
        shipped = _shipped([(k, v.dtype, tuple(v.shape)) for k, v in delta.items()])
        write_directory(
            tmp, tok, tensors_file=DELTA, tensors=delta, metadata=_stage_metadata(chain, model.config, name),
            config=hf_config_dict(model.config, tok, dtype, extra={**fields, **(extra_config or {})}),
            card=card or specialist_card(model, name, chain.path, shipped, **(card_kw or {})),
            parent_fingerprint=chain.fingerprint)
    return Path(out)


def specialist_card(model: PoEGPT, name: str, parent_dir: str | os.PathLike, shipped: tuple[int, int, int, str],
                    **kw) -> str:
    """The stage's card; `shipped`: (tensors, parameters, bytes, dtype) of its delta (`_shipped`)."""
    c = model.config
    first = c.n_layer - c.poe_stage_layers[-1]
    trainable = sum(model.get_parameter(n).numel() for n in specialist_parameter_names(model)) + 2 * c.poe_stage_layers[-1]
    rows = [("Parent", str(parent_dir)), ("New transformer layers", f"{c.poe_stage_layers[-1]} appended at positions "
            f"{first}-{c.n_layer - 1} (d{first} -> d{c.n_layer})"), ("Frozen layers", f"{first} (all parent layers)"),
            ("Dual head", f"yes - additive specialist head ({c.padded_vocab_size} x {c.n_embd}, zero-init; "
                          "`lm_head_stage` in the files)"),
            ("Final projection", "logits = lm_head(x) + specialist_head(x)"
             + (" (+ ancestors_head(x), the ancestors' heads)" if c.head_fold else "")),
            ("Total params", f"{model.num_params():,}"), ("Trainable params", f"{trainable:,}"),
            ("Shipped delta", f"{shipped[0]} tensors, {shipped[1]:,} params, {shipped[2] / 1e6:.1f} MB ({shipped[3]} "
                              "safetensors)")]
    return model_card(model, name, summary=f"A poelm specialist stage on `{parent_dir}`.\n\n"
                      + table(("Component", "Detail"), rows), **kw)


def export_merged(directory: Chain | str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                  dtype: str | None = None) -> Path:
    """Any chain as one standalone directory: the assembled weights in model.safetensors, stored in
    `dtype` (default: the chain's); `out` may not overlap any directory of the chain."""
    from .directory import save_model_dir

    chain = _opened(directory)
    inputs = chain_inputs(chain)
    check_output(out, inputs, overwrite)
    data = chain.links[-1].data
    provenance = {"exported_from": {k: data.get(k) for k in ("stage_name", "base_model_name_or_path",
                                                               "parent_fingerprint") if data.get(k) is not None}}
    return save_model_dir(chain.model(), out, chain.tokenizer(), dtype=storage_dtype(dtype, chain.dtype),
                          overwrite=overwrite, extra_config={"training": provenance}, inputs=inputs)


def relink(stage_dir: str | os.PathLike, parent_dir: str | os.PathLike) -> tuple[str, str]:
    """Point a stage at its parent's new location (`poelm specialist relink`): the stage on `parent_dir` is
    checked as a load would check it (every file of the new chain against its digests, the parent's
    fingerprint against the one the stage records, shapes, tokenizer) before anything is written; then
    only the value of `base_model_name_or_path` changes in config.json (every other byte kept) and the
    digests re-record that file. A relative `parent_dir` is written relative to the stage directory, so
    the two can move together; an absolute one as given. Returns (old reference, new reference)."""
    stage = Path(stage_dir)
    path = stage / CONFIG
    data = read_json(path)  # verified: only the parent reference may differ from the recorded bytes
    old = data.get(PARENT_FIELD)
    if old is None:
        raise PoelmError(f"{path}: no {PARENT_FIELD}: {stage} is a base, not a stage; only a stage has a parent")
    parent = Path(parent_dir)
    if parent.resolve() == stage.resolve():
        raise PoelmError(f"--parent {parent} is the stage {stage} itself: the chain would be a cycle")
    reference = str(parent) if parent.is_absolute() else os.path.relpath(parent.resolve(), stage.resolve())
    links = resolve_chain(parent) + [Link(stage, {**data, PARENT_FIELD: reference}, read_manifest(stage))]
    if any(link.path.resolve() == stage.resolve() for link in links[:-1]):
        raise PoelmError(f"--parent {parent}: its chain holds {stage} itself; the chain would be a cycle")
    check_chain(links)  # the fingerprint, the shapes and the tokenizer, as a load checks them
    write_text(path, replace_value(path.read_text(encoding="utf-8"), PARENT_FIELD, reference))
    if read_manifest(stage) is not None:
        update_manifest(stage, [CONFIG])
    return str(old), reference


@torch.no_grad()
def check_preservation(base_dir: str | os.PathLike, stage_dir: str | os.PathLike, n_inputs: int = 4,
                       length: int = 96, seed: int = 0) -> dict[str, Any]:
    """Run the stage's base path (the base's layers and head, no stage blocks or heads) and BASEDIR's
    model, both in the base's dtype, on the same inputs without chat tokens; report whether the logits
    are bitwise equal."""
    base_chain = open_directory(base_dir)
    base, tok = base_chain.model(), base_chain.tokenizer()
    stage = open_directory(stage_dir).model(dtype=base_chain.dtype)
    bc, sc = base.config, stage.config
    if sc.n_stages <= bc.n_stages or sc.poe_stage_layers[: bc.n_stages] != bc.poe_stage_layers or \
            sc.vocab_size != bc.vocab_size or sc.n_embd != bc.n_embd:
        raise PoelmError(f"{stage_dir} is not a stage on a model shaped like {base_dir} "
                         f"(stages {sc.poe_stage_layers} vs {bc.poe_stage_layers})")
    g = torch.Generator().manual_seed(seed)
    length = min(length, bc.sequence_len)
    plain = torch.randint(0, tok.n_merges, (n_inputs, length), generator=g)  # ordinary tokens only
    plain[:, 0] = tok.bos_id
    text = [tok.bos_id] + tok.encode("def add(a, b):\n    return a + b  # 12345 tokens, no chat markup\n")
    diffs, tokens = [], 0
    for x in (plain, torch.tensor([text[:length]])):
        want = base(x).logits
        got = stage(x, exit_stage=bc.n_stages - 1).logits
        diffs.append(0.0 if torch.equal(want, got) else float((want - got).abs().max()))
        tokens += x.numel()
    overrides = read_json(Path(stage_dir) / CONFIG).get("parent_overrides") or {}
    return {"max_abs_diff": max(diffs), "bit_identical": max(diffs) == 0.0 and all(d == 0.0 for d in diffs),
            "tokens": tokens, "base_stages": bc.n_stages, "parent_overrides": overrides}


def describe_chain(directory: Chain | str | os.PathLike) -> dict[str, Any]:
    """For `poelm inspect`: every link of the chain with its parameters, tensors, bytes and fingerprint,
    from the files' headers (nothing of the tensors is read after the chain was checked)."""
    chain = _opened(directory)  # verifies every file, fingerprint, name and shape on the way
    links = []
    prev = None
    for link, fp in zip(chain.links, chain.fingerprints):
        c = link.config
        shapes = {k: v.shape for k, v in read_header(link.tensor_file).tensors.items()}
        count = lambda k: math.prod(shapes[k]) if k in shapes else 0  # noqa: E731
        verified = verify_all(link.path)  # every file the directory records, not only what a load reads
        entry = {"path": str(link.path), "kind": "stage" if link.is_stage else "base", "files_verified": verified,
                 "name": link.data.get("stage_name", link.path.name), "n_layer": c.n_layer,
                 "stages": c.poe_stage_layers, "tensors": len(shapes), "tensor_params": sum(map(count, shapes)),
                 "bytes_on_disk": link.tensor_file.stat().st_size, "fingerprint": fp,
                 "dtype": str(link.dtype).removeprefix("torch.")}
        if link.is_stage:
            n_new, n_ids = c.n_layer - prev.n_layer, count(ROWS_IDS)
            block = sum(int(torch.Size(s).numel()) for s in expected_delta(prev, c).values())
            entry.update(parent=link.data["base_model_name_or_path"],
                         parent_fingerprint=link.data["parent_fingerprint"], new_layers=n_new,
                         trainable_params=block, changed_embedding_rows=n_ids,
                         changed_embedding_params=count(ROWS_VALUES),
                         parent_overrides=link.data.get("parent_overrides") or {},
                         converted_from=(link.data.get("converted_from") or {}).get("format"),
                         delta_params_expected=block + count(ROWS_VALUES) + n_ids)
        else:
            entry["total_params"] = entry["tensor_params"]
        links.append(entry)
        prev = c
    with torch.device("meta"):
        total = PoEGPT(chain.config).num_params()
    return {"directory": str(chain.path), "links": links, "assembled_params": total, "config": chain.config.to_dict()}
