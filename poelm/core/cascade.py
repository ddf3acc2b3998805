"""The cascade loader: resolve a chain of stage directories and assemble one model, every link checked
(digests, parent fingerprint, delta header, structure, tokenizer) before anything is returned. Ships
beside the model, so poelm and `transformers` assemble chains with the same code (docs/model.md §9.2,
docs/formats.md).

Memory: every tensor file is mapped, not read (tensorfile.py), and the model is built on the meta
device around the mapped tensors (`load_state_dict(assign=True)`): a load in the stored dtype holds
each tensor once, in the page cache's pages. Two steps of assembling a stage chain make new tensors,
because their values are in no file: the embedding table with a stage's changed rows written in (one
copy of the table for the whole chain), and the sum of two or more ancestors' heads (a single head is
taken as it is). Checking a chain (`check_chain`) makes neither; they are made when the assembled
tensors are first asked for (`Chain.tensors`, `Chain.model`).
"""

from __future__ import annotations

import functools
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .config import PoEConfig
from .files import (CONFIG, DELTA, TOKENIZER_FILE, WEIGHTS, read_json, read_manifest, verify_file, verifying,
                    warn_unverified)
from .errors import PoelmError
from .layers import block_shapes
from .model import PoEGPT, disk_name, from_disk, state_shapes, to_disk
from .tensorfile import (FINGERPRINT, HEADER_DTYPES, SCHEMES, Header, TensorInfo, fingerprint_file,
                         fingerprint_tensors, map_tensors, read_header, scheme_of)
from .tokenizer import Tokenizer

__all__ = ["HEADER_DTYPES", "TensorInfo", "fingerprint_tensors"]  # re-exported: where poelm has always found them

ROWS_IDS, ROWS_VALUES = "wte_rows.ids", "wte_rows.values"
OVERRIDE_PREFIX = "parent_overrides."
OVERRIDABLE = ("resid_lambdas", "x0_lambdas", "layer_windows")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A delta's optional tensors, each checked where it is used: changed embedding rows, declared overrides.
DELTA_EXTRAS = frozenset({ROWS_IDS, ROWS_VALUES} | {OVERRIDE_PREFIX + name for name in OVERRIDABLE})
# Files this process has mapped, by identity (device, inode, size, mtime): (header, tensors, verified).
Mapped = dict[tuple[int, int, int, int], tuple[Header, dict[str, torch.Tensor], bool]]


# ------------------------------------------------------------------------------------ files
def load_safetensors(path: str | os.PathLike, verify: bool = True,
                     check: Callable[[dict[str, TensorInfo]], None] | None = None,
                     mapped: Mapped | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, mapped (tensorfile.py: views into one private mapping, nothing
    copied), checked against its directory's digests (when it has them) by streaming the file while it
    is mapped; returned only if the digest matched. A missing, truncated or corrupt file is a one-line
    error naming it. `check` sees the header (names, shapes, dtypes) before anything is mapped, so a
    file that does not fit is refused at the cost of its header. `mapped`: files already mapped in this
    process (a caller opening several chains that share a base passes one dict, so the base is mapped
    and verified once and every chain's tensors are the same)."""
    path = Path(path)
    if not path.is_file():
        raise PoelmError(f"{path}: missing")
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if mapped is not None and key in mapped and (mapped[key][2] or not verify):
        header, tensors, _ = mapped[key]
        if check is not None:
            check(header.tensors)
        return dict(tensors)
    with verifying([path] if verify else []):  # hashed while it maps; returned only if it matched
        header = read_header(path)
        if check is not None:
            check(header.tensors)
        tensors = map_tensors(path, header)
    if mapped is not None:
        mapped[key] = (header, tensors, verify)
    return dict(tensors)


Shapes = Callable[[], Iterable[tuple[str, Any]]]  # a stream of (name, shape), that can be read again


def check_state_dict(expected: dict[str, Any] | Shapes, found: dict[str, Any], source: str,
                     dtype: torch.dtype | None = None) -> None:
    """Names and shapes must match exactly, and with `dtype` every tensor must have it; the message
    names the first offending tensor (missing, then unexpected, then shape, then dtype). `expected` may
    be a function giving a stream of (name, shape): nothing of it is held but what `found` also holds,
    so a claim of far more tensors than a file has costs no more than the file's header."""
    stream: Shapes = expected if callable(expected) else expected.items
    missing, n_missing, matched, wrong = None, 0, 0, None
    for k, v in stream():
        if k not in found:
            missing, n_missing = missing or k, n_missing + 1
            continue
        matched += 1
        shape = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
        if wrong is None and tuple(found[k].shape) != shape:
            wrong = f"{source}: tensor {k!r} has shape {list(found[k].shape)}, expected {list(shape)}"
        elif wrong is None and dtype is not None and found[k].dtype != dtype:
            wrong = (f"{source}: tensor {k!r} has dtype {str(found[k].dtype).removeprefix('torch.')}, "
                     f"expected {str(dtype).removeprefix('torch.')} (the dtype config.json declares)")
    if missing is not None:
        more = f" (and {n_missing - 1} more)" if n_missing > 1 else ""
        raise PoelmError(f"{source}: missing tensor {missing!r}{more}")
    if matched < len(found):  # every expected name is in `found`: holding them costs no more than it does
        names = {k for k, _ in stream()}
        unexpected = [k for k in found if k not in names]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise PoelmError(f"{source}: unexpected tensor {unexpected[0]!r}{more}")
    if wrong is not None:
        raise PoelmError(wrong)


# --------------------------------------------------------------------------------------- chain
@dataclass
class Link:
    """One directory of a chain: its path, its config.json, and its digests (None: none recorded)."""

    path: Path
    data: dict[str, Any]
    manifest: dict[str, Any] | None = None

    @property
    def is_stage(self) -> bool:
        return self.data.get("base_model_name_or_path") is not None

    @property
    def config(self) -> PoEConfig:
        return PoEConfig.from_dict(self.data, source=str(self.path / CONFIG))

    @property
    def tensor_file(self) -> Path:
        return self.path / (DELTA if self.is_stage else WEIGHTS)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype config.json declares for the floating tensors (float32 when it says none)."""
        name = self.data.get("dtype", self.data.get("torch_dtype")) or "float32"
        if name not in DTYPES:
            raise PoelmError(f"{self.path / CONFIG}: dtype {name!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[name]

    def tensors(self, verify: bool = True, expected: dict[str, tuple[int, ...]] | Shapes | None = None,
                optional: frozenset[str] = frozenset(), mapped: Mapped | None = None) -> dict[str, torch.Tensor]:
        """The link's tensors (mapped); with `expected`, its header must hold exactly those names (and any
        of `optional`, checked by the caller), shapes and the declared dtype before anything is mapped."""
        if expected is None:
            return load_safetensors(self.tensor_file, verify, mapped=mapped)
        dtype, source = self.dtype, str(self.tensor_file)

        def check(header: dict[str, TensorInfo]) -> None:
            check_state_dict(expected, {k: v for k, v in header.items() if k not in optional}, source, dtype)

        return load_safetensors(self.tensor_file, verify, check, mapped)

    def fingerprint(self, parent: str = "", scheme: str = FINGERPRINT) -> str:
        """The recorded fingerprint when it is in `scheme` (its content verified by the digests), else
        computed by streaming the tensor file (a stage's chained with `parent`)."""
        recorded = self.manifest.get("fingerprint") if self.manifest else None
        if recorded and scheme_of(recorded) == scheme:
            return recorded
        return fingerprint_file(self.tensor_file, parent if self.is_stage else "", scheme)


def chain_fingerprint(links: list[Link], scheme: str = FINGERPRINT) -> str:
    """The fingerprint of the chain ending at `links[-1]` (root first), in `scheme`."""
    fingerprint = ""
    for link in links:
        fingerprint = link.fingerprint(fingerprint, scheme)
    return fingerprint


def locate(reference: str, stage_dir: Path) -> Path:
    """A parent reference: absolute path, path relative to the stage, or a hub id (if reachable)."""
    if not isinstance(reference, str) or not reference:
        raise PoelmError(f"{stage_dir / CONFIG}: base_model_name_or_path {reference!r}: expected the parent's "
                         f"directory (a path, absolute or relative to this stage) or a hub id")
    candidates = [Path(reference)] if os.path.isabs(reference) else [stage_dir / reference, Path(reference)]
    for c in candidates:
        if c.is_dir():
            return c.resolve()  # a parent named relative to its stage: one plain absolute path
    where = ", ".join(str(c.absolute()) for c in candidates)
    fix = (f"if it moved, point base_model_name_or_path at it (`poelm specialist relink {stage_dir} --parent DIR` "
           f"checks that DIR is the parent this stage was made for)")
    if not os.path.isabs(reference) and reference.count("/") == 1 and not reference.startswith("."):
        try:  # a hub id: only when it is not a local path, and only if the hub answers
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(reference))
        except Exception as e:  # offline, unknown repo, no permission: say so, with the reason
            raise PoelmError(f"{stage_dir / CONFIG}: parent {reference!r} is missing: no directory at {where}, and "
                             f"the hub could not provide it ({type(e).__name__}); {fix}") from None
    raise PoelmError(f"{stage_dir / CONFIG}: parent {reference!r} is missing (looked for a directory at {where}); "
                     f"{fix}")


def resolve_chain(directory: str | os.PathLike, verify: bool = True) -> list[Link]:
    """The chain from the root base to `directory`, root first; each config.json verified."""
    path = Path(directory)
    if not path.is_dir():
        raise PoelmError(f"{path}: not a directory (expected a poelm model directory)")
    chain: list[Link] = []
    seen: dict[Path, Path] = {}
    while True:
        real = path.resolve()
        if real in seen:
            raise PoelmError(f"{chain[-1].path / CONFIG}: base_model_name_or_path leads back to {path}: "
                             "the chain is a cycle")
        seen[real] = path
        link = Link(path, read_json(path / CONFIG, verify), read_manifest(path))  # its recorded fingerprint
        if verify and link.manifest is None:                                      # serves unverified loads too
            warn_unverified(path, "model")
        if verify and link.manifest is not None:  # every other recorded file (small); the tensors as they load
            for name in sorted(set(link.manifest["files"]) - {CONFIG, link.tensor_file.name}):
                verify_file(path / name, link.manifest)
        chain.append(link)
        if not link.is_stage:
            if not (path / WEIGHTS).is_file():
                raise PoelmError(f"{path}: neither {WEIGHTS} (a base) nor base_model_name_or_path (a stage) "
                                 "in config.json")
            return chain[::-1]
        path = locate(str(link.data["base_model_name_or_path"]), path)


def expected_delta(parent: PoEConfig, config: PoEConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a stage delta must hold (embedding rows and declared overrides are optional and checked
    apart): the new blocks (no value embeddings), their lambdas and the stage's head."""
    n_new = config.n_layer - parent.n_layer
    out = {f"transformer.h.{i}.{name}": shape for i in range(parent.n_layer, config.n_layer)
           for name, shape in block_shapes(config).items()}
    out.update({"resid_lambdas": (n_new,), "x0_lambdas": (n_new,),
                "lm_head_stage.weight": (config.padded_vocab_size, config.n_embd)})
    return out


def check_overrides(overrides: Any, n_parent: int, source: str) -> dict[str, list[int]]:
    """A stage's declared `parent_overrides`, checked: {name: sorted parent layers}, names from OVERRIDABLE."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict) or any(k not in OVERRIDABLE for k in overrides) or not all(
            isinstance(v, list) and v and all(type(i) is int and 0 <= i < n_parent for i in v) and v == sorted(set(v))
            for v in overrides.values()):
        raise PoelmError(f"{source}: 'parent_overrides' must map some of {list(OVERRIDABLE)} to sorted, distinct "
                         f"parent layers in [0, {n_parent}), got {overrides!r}")
    return overrides


def check_extends(parent: PoEConfig, config: PoEConfig, source: str,
                  overrides: dict[str, list[int]] | None = None) -> None:
    """A stage's config must keep every structural fact of its parent and append one stage; windows may
    differ exactly at the parent layers `overrides["layer_windows"]` declares."""
    same = ("vocab_size", "n_head", "n_kv_head", "n_embd", "sequence_len", "rope_base", "softcap", "pad_vocab_to",
            "smear", "backout", "backout_layer", "value_embed_layers", "n_base_stages", "poe_stage_heads")
    for name in same:
        if getattr(parent, name) != getattr(config, name):
            raise PoelmError(f"{source}: {name} = {getattr(config, name)!r}, but its parent has "
                             f"{getattr(parent, name)!r}")
    if config.poe_stage_layers[:-1] != parent.poe_stage_layers or \
            config.n_layer != parent.n_layer + config.poe_stage_layers[-1]:
        raise PoelmError(f"{source}: poe_stage_layers/layer_windows do not extend the parent's by one stage")
    moved = [i for i, (a, b) in enumerate(zip(parent.layer_windows, config.layer_windows)) if a != b]
    if moved != (overrides or {}).get("layer_windows", []):
        raise PoelmError(f"{source}: layer_windows differ from the parent's at layers {moved}; a stage keeps its "
                         f"parent's windows (declared in parent_overrides: "
                         f"{(overrides or {}).get('layer_windows', [])})")
    if not config.stage_head or config.head_fold != (parent.stage_head or parent.head_fold):
        raise PoelmError(f"{source}: stage_head must be true and head_fold {parent.stage_head or parent.head_fold} "
                         "for a stage on this parent")


def check_tokenizer(parent: Path, stage: Path, verify: bool = True) -> None:
    a, b = parent / TOKENIZER_FILE, stage / TOKENIZER_FILE
    if not (a.is_file() and b.is_file()):
        return
    if verify:
        verify_file(a)
        verify_file(b)
    same = a.read_bytes() == b.read_bytes() or read_json(a, verify=False) == read_json(b, verify=False)
    if not same:
        raise PoelmError(f"{b}: the stage's tokenizer differs from its parent's ({a})")


@dataclass
class Parts:
    """A checked chain's tensors before the steps that copy (module docstring): the mapped tensors under
    the files' names (the leaf's lambdas already concatenated), each stage's changed embedding rows
    (ids, values) root first, and the heads to fold into `lm_head_fold`, in folding order."""

    tensors: dict[str, torch.Tensor]
    rows: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    heads: list[torch.Tensor] = field(default_factory=list)

    def embedding(self) -> torch.Tensor:
        """The leaf's embedding table: the root's (mapped) when no stage changed a row, else one copy with
        every stage's rows written in, root first (in the widest dtype of table and rows)."""
        wte = self.tensors["transformer.wte.weight"]
        if not self.rows:
            return wte
        wte = wte.to(functools.reduce(torch.promote_types, [v.dtype for _, v in self.rows], wte.dtype), copy=True)
        for ids, values in self.rows:
            wte[ids] = values.to(wte.dtype)
        return wte

    def materialise(self) -> dict[str, torch.Tensor]:
        """The assembled tensors: the table with its rows (`embedding`), the heads summed in order;
        everything else the mapped tensors themselves."""
        tensors = {**self.tensors, "transformer.wte.weight": self.embedding()}
        if self.heads:
            tensors["lm_head_fold.weight"] = functools.reduce(operator.add, self.heads)
        return tensors


def check_chain(chain: list[Link], verify: bool = True,
                mapped: Mapped | None = None) -> tuple[PoEConfig, Parts, list[str]]:
    """Check every link and gather the leaf's tensors without copying any: (config, parts, fingerprints)."""
    root = chain[0]
    config = root.config  # a root may carry specialist stages when it is a merged export
    tensors = root.tensors(verify, lambda: ((disk_name(k), v) for k, v in state_shapes(config)),  # header first
                           mapped=mapped)
    prints, parts = [root.fingerprint()], Parts(tensors)
    for i, link in enumerate(chain[1:], 1):
        specialist_config, delta, overrides = _checked_link(chain[:i], link, config, prints[-1], verify, mapped)
        prints.append(link.fingerprint(prints[-1]))
        rows = {k: delta.pop(k) for k in (ROWS_IDS, ROWS_VALUES) if k in delta}
        _apply_overrides(tensors, delta, overrides, link)
        if config.stage_head:  # the parent's own head joins the fold (after a merged root's own fold)
            fold = tensors.pop("lm_head_fold.weight", None)
            parts.heads += [fold] if fold is not None and not parts.heads else []
            parts.heads.append(tensors.pop("lm_head_stage.weight"))
        for name in ("resid_lambdas", "x0_lambdas"):
            own, new = tensors[name], delta.pop(name)
            dtype = torch.promote_types(own.dtype, new.dtype)
            tensors[name] = torch.cat([own.to(dtype), new.to(dtype)])
        if rows:
            parts.rows.append(_checked_rows(tensors["transformer.wte.weight"], rows, link))
        tensors.update(delta)
        config = specialist_config
    return config, parts, prints


def assemble(chain: list[Link], verify: bool = True,
             mapped: Mapped | None = None) -> tuple[PoEConfig, dict[str, torch.Tensor], list[str]]:
    """Check every link and build the leaf's state dict; returns (config, tensors, fingerprints)."""
    config, parts, prints = check_chain(chain, verify, mapped)
    return config, parts.materialise(), prints


def _checked_link(parents: list[Link], link: Link, config: PoEConfig, parent_print: str, verify: bool,
                  mapped: Mapped | None) -> tuple[PoEConfig, dict[str, torch.Tensor], dict[str, list[int]]]:
    """A stage link checked against its parent, `parents[-1]` (fingerprint, structure, tokenizer, delta
    header): its config, its delta tensors and its declared overrides. A parent fingerprint recorded in
    another scheme (an older poelm's) is compared with the parent's computed in that scheme."""
    source, parent = str(link.path / CONFIG), parents[-1]
    specialist_config = link.config
    recorded = link.data.get("parent_fingerprint")
    scheme = recorded.partition(":")[0] if isinstance(recorded, str) else None
    if recorded != parent_print and scheme in SCHEMES and scheme != scheme_of(parent_print):
        parent_print = chain_fingerprint(parents, scheme)
    if recorded != parent_print:
        raise PoelmError(f"{source}: parent {parent.path} has fingerprint {parent_print}, but this stage was "
                         f"trained on {recorded}: the parent is not the model this stage was made for")
    overrides = check_overrides(link.data.get("parent_overrides"), config.n_layer, source)
    check_extends(config, specialist_config, source, overrides)
    check_tokenizer(parent.path, link.path, verify)
    delta = link.tensors(verify, expected_delta(config, specialist_config), DELTA_EXTRAS, mapped)
    return specialist_config, delta, overrides


def _apply_overrides(tensors: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                     overrides: dict[str, list[int]], link: Link) -> None:
    """The parent layers' lambdas a stage declares it overrides, checked and written into `tensors`."""
    source, delta_path = str(link.path / CONFIG), str(link.tensor_file)
    for name in ("resid_lambdas", "x0_lambdas"):
        value = delta.pop(OVERRIDE_PREFIX + name, None)
        if (value is None) != (name not in overrides):
            raise PoelmError(f"{delta_path}: {OVERRIDE_PREFIX + name} {'missing' if value is None else 'present'}"
                             f", but {source} {'lists' if name in overrides else 'does not list'} {name} in "
                             f"parent_overrides")
        if value is None:
            continue
        own = tensors[name]
        if tuple(value.shape) != tuple(own.shape) or value.dtype != link.dtype:
            raise PoelmError(f"{delta_path}: {OVERRIDE_PREFIX + name} must be {str(link.dtype).removeprefix('torch.')}"
                             f" {list(own.shape)} (the parent's layers)")
        moved = (value.to(own.dtype) != own).nonzero().flatten().tolist()
        if moved != overrides[name]:
            raise PoelmError(f"{delta_path}: {OVERRIDE_PREFIX + name} differs from the parent at layers {moved}, "
                             f"{source} declares {overrides[name]}")
        tensors[name] = value.to(own.dtype)


def _checked_rows(wte: torch.Tensor, rows: dict[str, torch.Tensor], link: Link) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage's changed embedding rows (ids, values), checked against the table they are written into."""
    ids, values = rows.get(ROWS_IDS), rows.get(ROWS_VALUES)
    if ids is None or values is None or ids.dtype != torch.int64 or values.dtype != link.dtype \
            or ids.ndim != 1 or tuple(values.shape) != (len(ids), wte.size(1)) \
            or (len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < wte.size(0))):
        raise PoelmError(f"{link.tensor_file}: {ROWS_IDS}/{ROWS_VALUES} must be int64 ids (n,) in [0, {wte.size(0)}) "
                         f"and {str(link.dtype).removeprefix('torch.')} rows (n, {wte.size(1)})")
    return ids, values


@dataclass
class Chain:
    """A resolved, checked chain, built once and passed along: its links (root first), the assembled
    config, its tensors before assembly's copies (`parts`), and every link's fingerprint (the last is the
    leaf's own). `tensors` (under the names the files use) is assembled when first asked for."""

    links: list[Link]
    config: PoEConfig
    parts: Parts
    fingerprints: list[str]
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.links[-1].path

    @property
    def fingerprint(self) -> str:
        return self.fingerprints[-1]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self.parts.materialise()
        return self._tensors

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a load keeps: the stored one, or the widest where the links differ."""
        return functools.reduce(torch.promote_types, (link.dtype for link in self.links))

    def model(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PoEGPT:
        """The assembled model, built on the meta device around the chain's tensors (assigned, not copied):
        on the CPU in the stored dtype its parameters are the mapped tensors themselves. `dtype` (default:
        the stored one, `Chain.dtype`) converts what differs, one copy each. A fresh module each call,
        sharing its tensors with every other model of this chain: writing a parameter in place never
        reaches the files (copy-on-write) but is seen by those models; open the directory again for a
        model that must not see it."""
        dtype = dtype or self.dtype
        with torch.device("meta"):
            model = PoEGPT(self.config)
        check_state_dict(to_disk(model.state_dict()), self.tensors, f"{self.path} (assembled chain)")
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in from_disk(self.tensors).items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval()

    def tokenizer(self) -> Tokenizer:
        """The leaf's tokenizer (checked against its digests), which must fit the model's vocabulary."""
        tok = Tokenizer.load(self.path)
        if tok.vocab_size != self.config.vocab_size:
            raise PoelmError(f"{self.path}: tokenizer has {tok.vocab_size} tokens but config.json says "
                             f"vocab_size {self.config.vocab_size}")
        return tok


def open_chain(directory: str | os.PathLike, verify: bool = True, mapped: Mapped | None = None) -> Chain:
    """Resolve and check any base or stage directory, every link checked (content included); its tensors
    mapped, assembled when asked for. `mapped`: see `load_safetensors`."""
    links = resolve_chain(directory, verify)
    config, parts, prints = check_chain(links, verify, mapped)
    return Chain(links, config, parts, prints)


def load_chain(directory: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, verify: bool = True) -> PoEGPT:
    """The assembled model of any base or stage directory, checked link by link (content included), in
    the stored dtype unless `dtype` is given."""
    return open_chain(directory, verify).model(device, dtype)
