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
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .card import model_card, table
from ..core.cascade import (OVERRIDE_PREFIX, ROWS_IDS, ROWS_VALUES, Chain, Link, assemble, check_extends,
                           expected_delta, fingerprint_tensors, resolve_chain)
from ..core.config import PoEConfig, windows_from_pattern
from ..core.errors import PoelmError
from ..core.files import (CONFIG, DELTA, PARENT_FIELD, read_json, read_manifest, replace_value, update_manifest,
                         verify_all, write_text)
from ..core.model import PoEGPT, to_disk
from ..core.tokenizer import Tokenizer
from .directory import hf_config_dict, open as open_directory, write_directory
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


@torch.no_grad()
def warm_init_chat_rows(model: PoEGPT, tok: Tokenizer) -> list[int]:
    """Set each chat token's embedding row to the mean row of its source text; returns the ids."""
    wte = model.transformer.wte.weight
    ids = []
    for name, text in CHAT_ROW_SOURCES.items():
        source = tok.encode(text)
        wte[tok.token_id(name)] = wte[source].mean(dim=0)
        ids.append(tok.token_id(name))
    return ids


def _opened(chain: Chain | str | os.PathLike) -> Chain:
    """A chain value as it is; a directory opened (and checked) once (directory.open)."""
    return chain if isinstance(chain, Chain) else open_directory(chain)


@torch.no_grad()
def grow(parent: PoEGPT, n_layers: int, seed: int = 0) -> PoEGPT:
    """The parent model with one stage of `n_layers` new blocks appended (the identity at first) and a zero
    specialist head: every tensor of the parent is copied, the parent's own specialist head folded into
    the ancestors' head."""
    parent_config = parent.config
    model = PoEGPT(specialist_config(parent_config, n_layers))
    model.init_weights(seed)  # new blocks get nanochat's init (c_proj zero); everything else is copied
    own = model.state_dict()
    P = parent_config.n_layer
    for name, value in parent.state_dict().items():
        if name in ("resid_lambdas", "x0_lambdas"):
            own[name][:P] = value
            own[name][P:] = 1.0 if name == "resid_lambdas" else 0.0
        elif name not in ("specialist_head.weight", "ancestors_head.weight"):
            own[name].copy_(value)
    if parent_config.stage_head:  # the parent's head joins the ancestors' fold (the order cascade uses)
        head = parent.specialist_head.weight
        model.ancestors_head.weight.copy_(head if not parent_config.head_fold else parent.ancestors_head.weight + head)
    model.specialist_head.weight.zero_()
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
    out = {name: (state[name][:P] != own[name]).nonzero().flatten().tolist() for name in ("resid_lambdas", "x0_lambdas")}
    out["layer_windows"] = [i for i, (a, b) in enumerate(zip(parent.config.layer_windows, model.config.layer_windows))
                            if a != b]
    return {k: v for k, v in out.items() if v}


def delta_tensors(model: PoEGPT, parent: PoEGPT, allow_overrides: bool = False) -> dict[str, torch.Tensor]:
    """Exactly what the stage changed against its assembled parent. Changed parent lambdas are refused
    unless `allow_overrides` (a converted stage that declares them: cascade.py), then carried whole."""
    P = parent.config.n_layer
    state = model.state_dict()
    delta = {name: state[name] for name in specialist_parameter_names(model)}
    delta["resid_lambdas"] = state["resid_lambdas"][P:]
    delta["x0_lambdas"] = state["x0_lambdas"][P:]
    wte, parent_wte = state["transformer.wte.weight"], parent.state_dict()["transformer.wte.weight"]
    changed = (wte != parent_wte).any(dim=1).nonzero().flatten()
    if len(changed):
        delta[ROWS_IDS] = changed.to(torch.int64)
        delta[ROWS_VALUES] = wte[changed]
    # Everything else must be the parent's, or the delta would not reproduce the model.
    for name, value in parent.state_dict().items():
        if name in ("transformer.wte.weight", "resid_lambdas", "x0_lambdas", "specialist_head.weight",
                    "ancestors_head.weight"):
            continue
        if not torch.equal(state[name], value):
            raise PoelmError(f"tensor {name!r} of the parent changed: a stage may change only its own blocks, "
                             "lambdas, head and the chat-token embedding rows")
    overrides = parent_overrides(model, parent)
    for name in ("resid_lambdas", "x0_lambdas"):
        if name in overrides and not allow_overrides:
            raise PoelmError(f"the parent's layer lambdas changed ({name} of layers {overrides[name]}): a stage may "
                             "change only its own layers' lambdas")
        if name in overrides:
            delta[OVERRIDE_PREFIX + name] = state[name][:P]
    return {k: v.detach().to("cpu").contiguous() for k, v in to_disk(delta).items()}  # the file's names


def save_specialist(model: PoEGPT, parent: Chain | str | os.PathLike, out: str | os.PathLike, name: str, *,
               overwrite: bool = False, card: str | None = None, extra_config: dict[str, Any] | None = None,
               chat_rows_initialized: bool | None = None, card_kw: dict[str, Any] | None = None,
               allow_parent_overrides: bool = False) -> Path:
    """Write a stage directory (docs/formats.md) for `model`, a stage on `parent` (a chain, or its
    directory), atomically; `out` may not overlap any directory of the parent's chain.
    `allow_parent_overrides`: the model may change parent lambdas and windows (a converted stage, or one
    trained from it); they are then declared in `parent_overrides` and carried in the delta."""
    chain = _opened(parent)
    inputs = chain_inputs(chain, "parent")
    check_output(out, inputs, overwrite)
    tok = chain.tokenizer()
    parent_model = chain.model()
    overrides = parent_overrides(model.to("cpu"), parent_model) if allow_parent_overrides else {}
    check_extends(chain.config, model.config, f"the model to save as a stage on {chain.path}", overrides)
    delta = delta_tensors(model.to("cpu"), parent_model, allow_parent_overrides)
    out = Path(out)
    reference = os.path.relpath(chain.path.resolve(), out.resolve().parent / out.name)
    done = chat_rows_done(chain.links) or ROWS_IDS in delta if chat_rows_initialized is None else chat_rows_initialized
    stage_fields = {
        "base_model_name_or_path": reference, "stage_name": name, "stage_layers": model.config.poe_stage_layers[-1],
        "parent_fingerprint": chain.fingerprint, "chat_rows": delta[ROWS_IDS].tolist() if ROWS_IDS in delta else [],
        "chat_rows_initialized": bool(done),
    }
    if overrides:
        stage_fields["parent_overrides"] = overrides
    with AtomicDir(out, overwrite, inputs) as tmp:
        write_directory(
            tmp, tok, tensors_file=DELTA, tensors=delta,
            metadata={"poelm": "stage-delta/1", "stage_name": name, "parent_fingerprint": chain.fingerprint,
                      "parent_layers": str(chain.config.n_layer), "stage_layers": str(model.config.poe_stage_layers[-1])},
            config=hf_config_dict(model.config, tok, extra={**stage_fields, **(extra_config or {})}),
            card=card or specialist_card(model, name, chain.path, delta, **(card_kw or {})),
            fingerprint=fingerprint_tensors(delta, chain.fingerprint))
    return out


def specialist_card(model: PoEGPT, name: str, parent_dir: str | os.PathLike, delta: dict[str, torch.Tensor],
               **kw) -> str:
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
            ("Shipped delta", f"{len(delta)} tensors, {sum(t.numel() for t in delta.values()):,} params, "
                              f"{sum(t.numel() * t.element_size() for t in delta.values()) / 1e6:.1f} MB "
                              f"({next(iter(delta.values())).dtype if delta else 'n/a'})")]
    return model_card(model, name, summary=f"A poelm specialist stage on `{parent_dir}`.\n\n"
                      + table(("Component", "Detail"), rows), **kw)


def export_merged(directory: Chain | str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Any chain as one standalone directory: the assembled weights in model.safetensors; `out` may not
    overlap any directory of the chain."""
    from .directory import save_model_dir

    chain = _opened(directory)
    inputs = chain_inputs(chain)
    check_output(out, inputs, overwrite)
    data = chain.links[-1].data
    provenance = {"exported_from": {k: data.get(k) for k in ("stage_name", "base_model_name_or_path",
                                                               "parent_fingerprint") if data.get(k) is not None}}
    return save_model_dir(chain.model(), out, chain.tokenizer(), overwrite=overwrite,
                          extra_config={"training": provenance}, inputs=inputs)


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
    assemble(links)  # the fingerprint, the shapes and the tokenizer, as a load checks them
    write_text(path, replace_value(path.read_text(encoding="utf-8"), PARENT_FIELD, reference))
    if read_manifest(stage) is not None:
        update_manifest(stage, [CONFIG])
    return str(old), reference


@torch.no_grad()
def check_preservation(base_dir: str | os.PathLike, stage_dir: str | os.PathLike, n_inputs: int = 4,
                       length: int = 96, seed: int = 0) -> dict[str, Any]:
    """Run the stage's base path (the base's layers and head, no stage blocks or heads) and BASEDIR's
    model on the same inputs without chat tokens; report whether the logits are bitwise equal."""
    base_chain = open_directory(base_dir)
    base, tok = base_chain.model(), base_chain.tokenizer()
    del base_chain  # its tensors: the model holds its own copy
    stage = open_directory(stage_dir).model()
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
    """For `poelm inspect`: every link of the chain with its parameters, tensors, bytes and fingerprint."""
    chain = _opened(directory)  # verifies every file, fingerprint, name and shape on the way
    links = []
    prev = None
    for link, fp in zip(chain.links, chain.fingerprints):
        c = link.config
        tensors = link.tensors(verify=False)  # verified when the chain was opened
        path = link.tensor_file
        verified = verify_all(link.path)  # every file the directory records, not only what a load reads
        entry = {"path": str(link.path), "kind": "stage" if link.is_stage else "base", "files_verified": verified,
                 "name": link.data.get("stage_name", link.path.name), "n_layer": c.n_layer,
                 "stages": c.poe_stage_layers, "tensors": len(tensors),
                 "tensor_params": sum(t.numel() for t in tensors.values()),
                 "bytes_on_disk": path.stat().st_size, "fingerprint": fp}
        if link.is_stage:
            n_new = c.n_layer - prev.n_layer
            block = sum(int(torch.Size(s).numel()) for s in expected_delta(prev, c).values())
            rows = int(tensors[ROWS_VALUES].numel()) if ROWS_VALUES in tensors else 0
            entry.update(parent=link.data["base_model_name_or_path"], parent_fingerprint=link.data["parent_fingerprint"],
                         new_layers=n_new, trainable_params=block, changed_embedding_rows=len(tensors.get(ROWS_IDS, [])),
                         changed_embedding_params=rows, parent_overrides=link.data.get("parent_overrides") or {},
                         converted_from=(link.data.get("converted_from") or {}).get("format"),
                         delta_params_expected=block + rows + (len(tensors[ROWS_IDS]) if ROWS_IDS in tensors else 0))
        else:
            entry["total_params"] = sum(t.numel() for t in tensors.values())
        links.append(entry)
        prev = c
    with torch.device("meta"):
        total = PoEGPT(chain.config).num_params()
    return {"directory": str(chain.path), "links": links, "assembled_params": total, "config": chain.config.to_dict()}
