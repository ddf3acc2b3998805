"""A plain reference implementation of nanochat-poe (the paper's nanochat fork), for parity tests only.

What it is
    An independent re-implementation of the on-disk formats and forward passes of "nanochat-poe"
    (jaepil/nanochat), as /work/shared/design/POE_FORMATS.md states them (cited below as §1-§5):
    - a fork base (`ForkGPT`): the upstream nanochat GPT of tests/nanochat_ref.py plus `poe_every`
      (the stage rule) and optional per-stage heads `lm_head_stages.{k}` (§1);
    - its two inference read-outs (`fork_base_logits`, §3): the upstream last-layer forward, or the
      per-stage-head Log-OP of gpt.py @276c2ac;
    - the files `base_train` writes for it, in three gpt.py/base_train meta layouts
      (`save_fork_base`, §1);
    - a specialist stage as `specialist_sft_new_stage.py --dual-head` trains it (`ForkStage`,
      `build_fork_stage`, §2), its monkey-patched forward (`fork_stage_logits`, §3) and the delta
      `save_stage_delta` writes (`save_fork_stage`, §2), including a chained stage (§3 "Chain").

Why it is independent
    poelm must convert the fork's checkpoints into its own format with identical logits. The fork
    cannot be installed here, so this file stands in for it: it is the other side of the parity
    test and imports nothing from `poelm` (only torch, the standard library and the independent
    upstream reference tests/nanochat_ref.py, whose GPT, blocks, init and perturbation it reuses).
    It is written from POE_FORMATS.md, not from poelm's model code, so that a bug shared by both
    sides cannot hide.

Design choices (simple and obviously correct, not fast)
    - Everything computes in float32 (bf16 embeddings are only a file layout: `embedding_dtype`).
    - Randomness is explicit (seeded generators), and every tensor is moved off its init, including
      the ones the fork zero-initialises (per-stage heads, lm_head_stage, new c_proj), so that a
      conversion test sees every tensor matter.
    - A stage holds references to its base (and its parent stage, for a chain); it never modifies
      them. Its own tensors are exactly the ones its delta file holds.

The numbered forwards (norm = RMSNorm without weight; softcap(z) = 15 * tanh(z / 15);
crop = [..., :vocab_size]; steps 1-8 are nanochat_ref's numbered forward):
    A. Fork base, no per-stage heads (§3 "Base inference"; also gpt.py @40710e1d with heads): exactly
       nanochat_ref's GPT.forward: norm(wte) -> smear -> per layer x = rl[i] x + xl[i] x0, block with
       window i -> x_backout after layer L//2 -> x - backout_lambda x_backout -> norm -> lm_head ->
       crop -> float -> softcap.
    B. Fork base with per-stage heads (§3, gpt.py @276c2ac): stage k ends at layer i when
       (i+1) % poe_every == 0 or i == L-1; x_k = the residual stream after that layer;
       logits = sum_k log_softmax(softcap(crop(lm_head(norm(x_k)) + lm_head_stages[k](norm(x_k)))))
                / K ** (1 - alpha).
       No backout anywhere (backout_lambda is unused), not renormalised.
    C. Specialist stage (§3 "Specialist forward", the script's monkey-patched forward):
       1. x = norm(stage.wte(idx)); smear with the base's smear_gate / smear_lambda; x0 = x
       2. layers = base blocks + parent stage's blocks (chain) + own blocks, total n_layer;
          per layer x = stage.resid_lambdas[i] x + stage.x0_lambdas[i] x0;
          value embeddings (the base's value_embeds.{i}) only on the base's VE layers;
          windows = nanochat's rule for the TOTAL depth (pattern tiled, last layer forced L);
          x_backout after layer base_L // 2
       3. after the last layer only: x = x - base.backout_lambda x_backout; h = norm(x)
       4. lm_head_eff = base lm_head.weight + lm_head_stage.weight of every ancestor stage (fold)
       5. logits = softcap(crop(h lm_head_eff^T + lm_head_stage(h)))
       No intermediate read-outs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F  # nothing from poelm: this is the independent side of a parity test

try:  # tests/ is not a package today; keep working if it becomes one
    from tests import nanochat_ref as ref
except ImportError:
    import nanochat_ref as ref

GPTConfig = ref.GPTConfig
SOFTCAP = ref.SOFTCAP

POE_MODES = ("none", "flat", "hier")
# The gpt.py / base_train versions whose meta layouts differ (§1).
FORK_VERSIONS = ("8c76679a", "40710e1d", "276c2ac")
UPSTREAM_MODEL_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
# The 6 weights of a stage's new block, in the order save_stage_delta's keys list them (§2).
BLOCK_WEIGHTS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
N_CHAT_TOKENS = 8  # user/assistant/python/output start+end; bos is not one of them (§2)


# ---------------------------------------------------------------- stages of a PoE base (§1)


def stage_ends(n_layer: int, poe_every: int) -> list[int]:
    """Last layer of each PoE stage (§1): layer i ends a stage when (i+1) % poe_every == 0 or i == L-1.

    stage_ends(24, 6) == [5, 11, 17, 23]; stage_ends(20, 6) == [5, 11, 17, 19] (sizes 6, 6, 6, 2).
    """
    if poe_every < 1:
        raise ValueError(f"poe_every must be >= 1, got {poe_every}")
    return [i for i in range(n_layer) if (i + 1) % poe_every == 0 or i == n_layer - 1]


def stage_sizes(n_layer: int, poe_every: int) -> list[int]:
    """Number of layers per stage, from `stage_ends` (d20/6 -> [6, 6, 6, 2])."""
    ends = stage_ends(n_layer, poe_every)
    return [end - start for start, end in zip([-1] + ends[:-1], ends)]


def softcap(logits: torch.Tensor) -> torch.Tensor:
    """15 * tanh(z / 15), as nanochat's forward applies it after the crop and the cast to float."""
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


# ---------------------------------------------------------------- the fork base (§1)


class ForkGPT(ref.GPT):
    """The fork's GPT: nanochat_ref.GPT plus `poe_every` and optional per-stage heads (§1).

    `lm_head_stages` is an nn.ModuleList of K Linear(d, Vp, bias=False), K = len(stage_ends(L,
    poe_every)), so its state-dict keys are `lm_head_stages.{k}.weight`; None without per-stage
    heads (no keys). The inherited `forward` is forward A (the last-layer read-out with backout);
    `fork_base_logits` picks A or B. All of nanochat_ref's feature switches must be on: the fork is
    the current nanochat (smear, backout, value embeds, lambdas, windows all present, §1).
    """

    def __init__(self, config: GPTConfig, poe_every: int = 1, per_stage_head: bool = False):
        off = [f for f in ("smear", "backout", "value_embeds", "lambdas", "sliding_window") if not getattr(config, f)]
        if off:
            raise ValueError(f"the fork base has every upstream feature; switched off: {off}")
        super().__init__(config)
        self.poe_every = poe_every
        self.per_stage_head = per_stage_head
        self.stage_ends = stage_ends(config.n_layer, poe_every)
        if per_stage_head:
            d, Vp = config.n_embd, config.padded_vocab_size
            self.lm_head_stages = nn.ModuleList([nn.Linear(d, Vp, bias=False) for _ in self.stage_ends])
        else:
            self.lm_head_stages = None

    @property
    def n_stages(self) -> int:
        return len(self.stage_ends)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """nanochat_ref's init, plus zero per-stage heads (the fork zero-initialises them)."""
        super().init_weights(generator)
        if self.lm_head_stages is not None:
            for head in self.lm_head_stages:
                head.weight.zero_()


class _ParametersExcept:
    """A view of a model for nanochat_ref.perturb_ that hides some parameters (it raises on unknown names)."""

    def __init__(self, model: nn.Module, skip_prefix: str):
        self.config = model.config
        self._model = model
        self._skip = skip_prefix

    def named_parameters(self):
        return ((n, p) for n, p in self._model.named_parameters() if not n.startswith(self._skip))


@torch.no_grad()
def perturb_fork_(model: ForkGPT, generator: torch.Generator) -> ForkGPT:
    """nanochat_ref.perturb_ on every upstream parameter, plus random per-stage heads.

    After it: lambdas are off resid 1 / x0 0, smear_lambda and backout_lambda clearly nonzero,
    ve gates and every c_proj random, lm_head large enough to reach the softcap's curved region,
    and each `lm_head_stages.{k}` a random matrix of a third of lm_head's scale (so that both heads
    of a stage matter).
    """
    ref.perturb_(_ParametersExcept(model, "lm_head_stages."), generator)
    if model.lm_head_stages is not None:
        d = model.config.n_embd
        for head in model.lm_head_stages:
            head.weight.copy_(1.0 / math.sqrt(d) * torch.randn(head.weight.shape, generator=generator))
    return model


def build_fork_base(config: GPTConfig, *, poe_every: int = 1, per_stage_head: bool = False, seed: int = 0,
                    perturb: bool = True) -> ForkGPT:
    """A float32 CPU fork base: init_weights() then (by default) perturb_fork_(), one generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    model = ForkGPT(config, poe_every=poe_every, per_stage_head=per_stage_head)
    model.init_weights(g)
    if perturb:
        perturb_fork_(model, g)
    return model.eval()


def fork_base_stage_states(model: ForkGPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """x_k for every stage k (§3 "Flat training"): the residual stream right after stage k's last layer.

    The same per-layer loop as forward A (steps 1-7 of nanochat_ref), with no backout: the fork's
    stage read-outs never subtract it. (Training detaches x at stage starts; that changes no value.)
    """
    T = idx.size(1)
    cos_sin = model.cos[:, :T], model.sin[:, :T]
    x = model.embed(idx)
    x0 = x
    states = []
    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        ve = model.value_embeds[str(i)](idx).float() if str(i) in model.value_embeds else None
        x = block(x, ve, cos_sin, model.window_sizes[i])
        if i in model.stage_ends:
            states.append(x)
    return states


def fork_base_logits(model: ForkGPT, idx: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """The fork base's inference output, idx (B, T) -> (B, T, vocab_size) float32 (§3).

    Without per-stage heads: forward A, the upstream nanochat forward (nanochat_ref.GPT.forward;
    `alpha` is ignored). With per-stage heads: forward B, gpt.py @276c2ac's Log-OP
        sum_k log_softmax(softcap(crop(lm_head(n_k) + lm_head_stages[k](n_k)))) / K ** (1 - alpha),
    n_k = norm(x_k): no backout, not renormalised. (gpt.py @40710e1d returns forward A even with
    per-stage heads: that is `ref.GPT.forward(model, idx)`, i.e. `model(idx)`.)
    """
    with torch.no_grad():
        if model.lm_head_stages is None:
            return ref.GPT.forward(model, idx)
        vocab = model.config.vocab_size
        K = model.n_stages
        total = None
        for k, x_k in enumerate(fork_base_stage_states(model, idx)):
            n_k = ref.norm(x_k)
            z = model.lm_head(n_k) + model.lm_head_stages[k](n_k)
            lp = F.log_softmax(softcap(z[..., :vocab].float()), dim=-1)
            total = lp if total is None else total + lp
        return total / (K ** (1.0 - alpha))


# ---------------------------------------------------------------- base_train's files (§1)


def fork_base_meta(model: ForkGPT, step: int, *, poe_mode: str, poe_every: int, poe_alpha: float, version: str,
                   model_tag: str | None = None, model_config_poe_every: int | None = None) -> dict:
    """meta_{step:06d}.json of base_train, in the layout of `version` (§1).

    model_config:
      "8c76679a": the 7 upstream fields only.
      "40710e1d": + dual_head false, frozen_layers 0, per_stage_head, poe_every. model_config's
                  poe_every is written as 1 by default (`model_config_poe_every` overrides): the
                  trap §1 warns about; the real value lives in user_config.
      "276c2ac":  as 40710e1d, model_config poe_every = the real one by default, + intermediate_size 0.
    user_config (base_train's argparse dict): poe_mode, poe_every, and, except for 8c76679a,
    poe_alpha and per_stage_head; plus unrelated args.
    """
    if version not in FORK_VERSIONS:
        raise ValueError(f"version must be one of {FORK_VERSIONS}, got {version!r}")
    if poe_mode not in POE_MODES:
        raise ValueError(f"poe_mode must be one of {POE_MODES}, got {poe_mode!r}")
    cfg = model.config
    per_stage_head = model.lm_head_stages is not None
    if per_stage_head and poe_every != model.poe_every:
        raise ValueError(f"poe_every={poe_every} but the model's per-stage heads follow poe_every={model.poe_every}")
    if version == "8c76679a" and (per_stage_head or poe_alpha != 0.0):
        raise ValueError("the 8c76679a layout has neither per-stage heads nor poe_alpha")

    model_config = {k: getattr(cfg, k) for k in UPSTREAM_MODEL_CONFIG_FIELDS}
    if version in ("40710e1d", "276c2ac"):
        if model_config_poe_every is None:
            model_config_poe_every = 1 if version == "40710e1d" else poe_every
        model_config.update(dual_head=False, frozen_layers=0, per_stage_head=per_stage_head,
                            poe_every=model_config_poe_every)
    if version == "276c2ac":
        model_config["intermediate_size"] = 0

    device_batch_size, total_batch_size = 4, 4 * cfg.sequence_len
    user_config = {
        "run": "dummy",
        "device_type": "",
        "depth": cfg.n_layer,
        "aspect_ratio": cfg.n_embd // cfg.n_layer,
        "head_dim": cfg.head_dim,
        "max_seq_len": cfg.sequence_len,
        "window_pattern": cfg.window_pattern,
        "num_iterations": step,
        "device_batch_size": device_batch_size,
        "total_batch_size": total_batch_size,
        "embedding_lr": 0.3,
        "matrix_lr": 0.02,
        "eval_every": 250,
        "model_tag": model_tag,
        "poe_mode": poe_mode,
        "poe_every": poe_every,
    }
    if version != "8c76679a":
        user_config["poe_alpha"] = poe_alpha
        user_config["per_stage_head"] = per_stage_head
    return {
        "step": step,
        "val_bpb": 0.9876,
        "model_config": model_config,
        "user_config": user_config,
        "device_batch_size": device_batch_size,
        "max_seq_len": cfg.sequence_len,
        "total_batch_size": total_batch_size,
        "dataloader_state_dict": {"pq_idx": 3, "rg_idx": 7, "epoch": 1},
        "loop_state": {"min_val_bpb": 0.9876, "smooth_train_loss": 3.21, "total_training_time": 1234.5},
    }


def save_fork_base(
    model: ForkGPT,
    directory: str | Path,
    step: int,
    *,
    poe_mode: str = "flat",
    poe_every: int | None = None,
    poe_alpha: float = 0.0,
    version: str = "276c2ac",
    embedding_dtype: torch.dtype = torch.float32,
    model_tag: str | None = None,
    model_config_poe_every: int | None = None,
    write_optim: bool = True,
) -> tuple[Path, Path]:
    """Write base_train's files for a fork base (§1); returns (model_path, meta_path).

    - `model_{step:06d}.pt`: torch.save of the state dict (no `_orig_mod.` prefix, no rotary
      buffers): every upstream key, `lm_head_stages.{k}.weight` with per-stage heads;
      `transformer.wte.weight` and `value_embeds.{i}.weight` in `embedding_dtype` (bf16 as after a
      CUDA run), the rest float32.
    - `meta_{step:06d}.json`: `fork_base_meta(...)` (poe_every None = the model's).
    - `optim_{step:06d}_rank0.pt` (write_optim): a small optimizer-like dict a converter must ignore.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if poe_every is None:
        poe_every = model.poe_every
    meta = fork_base_meta(model, step, poe_mode=poe_mode, poe_every=poe_every, poe_alpha=poe_alpha,
                          version=version, model_tag=model_tag, model_config_poe_every=model_config_poe_every)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if key == "transformer.wte.weight" or key.startswith("value_embeds."):
            tensor = tensor.to(embedding_dtype)
        state[key] = tensor
    model_path = directory / f"model_{step:06d}.pt"
    meta_path = directory / f"meta_{step:06d}.json"
    torch.save(state, model_path)
    meta_path.write_text(json.dumps(meta, indent=2))
    if write_optim:
        torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.02}]},
                   directory / f"optim_{step:06d}_rank0.pt")
    return model_path, meta_path


# ---------------------------------------------------------------- specialist stages (§2, §3)


def default_chat_token_ids(vocab_size: int) -> list[int]:
    """The 8 chat tokens of a nanochat tokenizer: the last 8 ids (bos is the 9th from the end)."""
    return list(range(vocab_size - N_CHAT_TOKENS, vocab_size))


# Rows the 8 chat tokens are copied from (§2: "User", "\n", "Assistant", "```", "Output"), here
# arbitrary fixed ordinary ids standing in for those words: user_start <- "User", user_end <- "\n",
# assistant_start <- "Assistant", assistant_end <- "\n", python_start/end <- "```",
# output_start <- "Output", output_end <- "\n".
DEFAULT_CHAT_SOURCE_IDS = (101, 10, 102, 10, 103, 103, 104, 10)


class ForkStage(nn.Module):
    """A specialist stage as `specialist_sft_new_stage.py --dual-head` holds it (§2).

    Own tensors (exactly what its delta file holds): `new_blocks` (n upstream Blocks, no ve_gate,
    global layer indices frozen_layers .. n_layer-1), `lm_head_stage` Linear(d, Vp), `wte` (the whole
    table) and `resid_lambdas` / `x0_lambdas` at the full length n_layer. Referenced, never changed:
    `base` (the ForkGPT) and `parent` (the parent ForkStage of a chain, else None). Derived:
    `frozen_layers` (the parent's depth), `n_layer` (total), `backout_layer` (base L // 2),
    `window_sizes` (nanochat's rule for the total depth), `config` (the base's GPTConfig with the
    total n_layer, for the meta).
    """

    def __init__(self, base: ForkGPT, parent: "ForkStage | None", new_layers: int):
        super().__init__()
        if parent is not None and parent.parent is not None:
            raise ValueError("the fork rebuilds only base + 1 parent stage (§3 Chain): no grandparent stages")
        # Plain attributes, not submodules: the stage's parameters are only its own.
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "parent", parent)
        bc = base.config
        self.frozen_layers = parent.n_layer if parent is not None else bc.n_layer
        self.n_layer = self.frozen_layers + new_layers
        self.backout_layer = bc.n_layer // 2
        self.config = dataclasses.replace(bc, n_layer=self.n_layer)
        self.window_sizes = ref.compute_window_sizes(self.config)
        block_cfg = dataclasses.replace(bc, value_embeds=False)  # new blocks have no ve_gate
        self.new_blocks = nn.ModuleList([ref.Block(block_cfg, self.frozen_layers + j) for j in range(new_layers)])
        self.lm_head_stage = nn.Linear(bc.n_embd, bc.padded_vocab_size, bias=False)
        self.wte = nn.Embedding(bc.padded_vocab_size, bc.n_embd)
        self.resid_lambdas = nn.Parameter(torch.ones(self.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(self.n_layer))

    def all_blocks(self) -> list[nn.Module]:
        """Blocks 0..n_layer-1: the base's, the parent stage's own (chain), this stage's own."""
        blocks = list(self.base.transformer.h)
        if self.parent is not None:
            blocks += list(self.parent.new_blocks)
        return blocks + list(self.new_blocks)

    def ancestors(self) -> list["ForkStage"]:
        """The ancestor stages whose lm_head_stage is folded into the lm_head (oldest first)."""
        return [self.parent] if self.parent is not None else []

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """The 6·n+4 tensors `save_stage_delta` writes (§2), under the fork's key names."""
        out = {}
        for j, block in enumerate(self.new_blocks):
            i = self.frozen_layers + j
            for name in BLOCK_WEIGHTS:
                out[f"transformer.h.{i}.{name}.weight"] = block.get_parameter(f"{name}.weight").detach()
        out["lm_head_stage.weight"] = self.lm_head_stage.weight.detach()
        out["transformer.wte.weight"] = self.wte.weight.detach()
        out["resid_lambdas"] = self.resid_lambdas.detach()
        out["x0_lambdas"] = self.x0_lambdas.detach()
        return out


def parent_lambdas(parent: ForkGPT | ForkStage) -> tuple[torch.Tensor, torch.Tensor]:
    """(resid_lambdas, x0_lambdas) of a base or stage, detached copies."""
    return parent.resid_lambdas.detach().clone(), parent.x0_lambdas.detach().clone()


@torch.no_grad()
def build_fork_stage(
    parent: ForkGPT | ForkStage,
    new_layers: int,
    generator: torch.Generator,
    *,
    neutral: bool = False,
    chat_token_ids: list[int] | None = None,
    chat_source_ids: tuple[int, ...] | list[int] = DEFAULT_CHAT_SOURCE_IDS,
) -> ForkStage:
    """A trained-looking specialist stage on `parent` (a fork base, or a stage on a base) (§2).

    neutral=False (default), every own tensor is random and matters:
      - new blocks: nanochat's block init (c_q/c_k/c_v uniform ±sqrt(3/d), c_fc ±0.4·that) and random
        c_proj (attn and mlp; zero at the fork's init);
      - lm_head_stage: random, a third of lm_head's scale (zero at the fork's init);
      - wte: the parent's table; for a stage on a base the 8 `chat_token_ids` rows (default: the last
        8 ids) are copied from `chat_source_ids` rows plus a little noise; a chained stage skips the
        copy, so its wte equals its parent's;
      - lambdas at the full length: entries 0..backout_layer (base L//2) drift off the parent's
        (they train, §2), entries backout_layer+1..frozen_layers-1 equal the parent's, new entries
        random (resid ~ 1 ± 0.1, x0 ~ 0.1 ± 0.1).
    neutral=True: the same blocks' c_q/c_k/c_v/c_fc, but zero lm_head_stage, zero new c_proj, new
    lambdas resid 1 / x0 0, the parent's wte and lambdas unchanged: a stage whose logits equal its
    parent's last-layer logits when the total-depth windows leave the parent's windows unchanged.
    """
    if isinstance(parent, ForkStage):
        base, parent_stage = parent.base, parent
    elif isinstance(parent, ForkGPT):
        base, parent_stage = parent, None
    else:
        raise TypeError(f"parent must be a ForkGPT or ForkStage, got {type(parent).__name__}")
    if new_layers < 1:
        raise ValueError(f"new_layers must be >= 1, got {new_layers}")
    g = generator
    stage = ForkStage(base, parent_stage, new_layers)
    d = base.config.n_embd
    s = math.sqrt(3) / math.sqrt(d)

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    for block in stage.new_blocks:
        block.attn.c_q.weight.uniform_(-s, s, generator=g)
        block.attn.c_k.weight.uniform_(-s, s, generator=g)
        block.attn.c_v.weight.uniform_(-s, s, generator=g)
        block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s, generator=g)
        for proj in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            proj.copy_(torch.zeros_like(proj) if neutral else 0.5 / math.sqrt(proj.shape[-1]) * randn(proj.shape))

    w = stage.lm_head_stage.weight
    w.copy_(torch.zeros_like(w) if neutral else 1.0 / math.sqrt(d) * randn(w.shape))

    parent_wte = (parent.wte if parent_stage is not None else base.transformer.wte).weight.detach().float()
    stage.wte.weight.copy_(parent_wte)
    if not neutral and parent_stage is None:  # §2: a chained stage skips the chat-row copy
        ids = chat_token_ids if chat_token_ids is not None else default_chat_token_ids(base.config.vocab_size)
        if len(ids) != len(chat_source_ids):
            raise ValueError("chat_token_ids and chat_source_ids must have the same length")
        for dst, src in zip(ids, chat_source_ids):
            row = parent_wte[src]
            stage.wte.weight[dst] = row + 0.05 * row.std() * randn(row.shape)

    rl, xl = parent_lambdas(parent)
    F_ = stage.frozen_layers
    new_rl, new_xl = torch.ones(stage.n_layer), torch.zeros(stage.n_layer)
    new_rl[:F_], new_xl[:F_] = rl, xl
    if not neutral:
        b = stage.backout_layer + 1  # entries 0..backout_layer drift
        new_rl[:b] += 0.05 * randn(b)
        new_xl[:b] += 0.05 * randn(b)
        new_rl[F_:] = 1.0 + 0.1 * randn(new_layers)
        new_xl[F_:] = 0.1 + 0.1 * randn(new_layers)
    stage.resid_lambdas.copy_(new_rl)
    stage.x0_lambdas.copy_(new_xl)
    return stage.eval()


@torch.no_grad()
def round_stage_embeddings_(stage: ForkStage, dtype: torch.dtype = torch.bfloat16) -> ForkStage:
    """Round the stage's wte through `dtype` in place, so it computes what a delta saved with
    `save_fork_stage(..., embedding_dtype=dtype)` computes after loading. (For a base use
    nanochat_ref.round_embeddings_, which rounds wte and value_embeds.)"""
    stage.wte.weight.copy_(stage.wte.weight.to(dtype).float())
    return stage


def fork_stage_lm_head_weight(stage: ForkStage) -> torch.Tensor:
    """lm_head_eff (§3 "Chain"): the base's lm_head.weight + every ancestor's lm_head_stage.weight."""
    w = stage.base.lm_head.weight.detach().clone()
    for ancestor in stage.ancestors():
        w = w + ancestor.lm_head_stage.weight.detach()
    return w


def fork_stage_hidden(stage: ForkStage, idx: torch.Tensor) -> torch.Tensor:
    """Steps C.1-C.3: h = norm(x_last - backout_lambda · x_backout), (B, T, d)."""
    base = stage.base
    B, T = idx.shape
    cos_sin = base.cos[:, :T], base.sin[:, :T]
    with torch.no_grad():
        # C.1: the stage's wte, the base's smear.
        x = ref.norm(stage.wte(idx).float())
        if T > 1:
            gate = base.smear_lambda * torch.sigmoid(base.smear_gate(x[:, 1:, : ref.SMEAR_GATE_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0 = x
        x_backout = None
        # C.2: all layers, the stage's lambdas, the base's value embeds, total-depth windows.
        for i, block in enumerate(stage.all_blocks()):
            x = stage.resid_lambdas[i] * x + stage.x0_lambdas[i] * x0
            ve = base.value_embeds[str(i)](idx).float() if str(i) in base.value_embeds else None
            x = block(x, ve, cos_sin, stage.window_sizes[i])
            if i == stage.backout_layer:
                x_backout = x
        # C.3: backout after the last layer only.
        x = x - base.backout_lambda * x_backout
        return ref.norm(x)


def fork_stage_logits(stage: ForkStage, idx: torch.Tensor) -> torch.Tensor:
    """The fork's monkey-patched specialist forward (§3), idx (B, T) -> (B, T, vocab_size) float32:
    softcap(crop(lm_head_eff(h) + lm_head_stage(h))), h from `fork_stage_hidden` (forward C)."""
    with torch.no_grad():
        h = fork_stage_hidden(stage, idx)
        z = F.linear(h, fork_stage_lm_head_weight(stage)) + stage.lm_head_stage(h)
        return softcap(z[..., : stage.config.vocab_size].float())


def fork_stage_meta(stage: ForkStage, step: int, *, base_tag: str, parent_stage_tag: str | None = None,
                    parent_stage_step: int | None = None, model_step: int | None = None) -> dict:
    """meta_{step:06d}.json of save_stage_delta (§2)."""
    if (parent_stage_tag is not None) != (stage.parent is not None):
        raise ValueError("parent_stage_tag must be given exactly for a chained stage")
    cfg = stage.config
    model_config = {k: getattr(cfg, k) for k in UPSTREAM_MODEL_CONFIG_FIELDS}
    model_config.update(dual_head=True, frozen_layers=stage.frozen_layers)
    user_config = {
        "run": "dummy",
        "device_type": "",
        "model_tag": base_tag,
        "model_step": model_step,
        "new_layers": stage.n_layer - stage.frozen_layers,
        "parent_stage_tag": parent_stage_tag,
        "parent_stage_step": parent_stage_step,
        "output_tag": None,
        "dual_head": True,
        "device_batch_size": 4,
        "num_epochs": 1,
        "matrix_lr": 0.02,
        "embedding_lr": 0.2,
    }
    return {
        "step": step,
        "smooth_loss": 1.2345,
        "model_config": model_config,
        "user_config": user_config,
        "base_model_dir": base_tag,
        "dual_head": True,
        "frozen_layers": stage.frozen_layers,
    }


def save_fork_stage(
    stage: ForkStage,
    directory: str | Path,
    step: int,
    *,
    base_tag: str,
    parent_stage_tag: str | None = None,
    parent_stage_step: int | None = None,
    model_step: int | None = None,
    embedding_dtype: torch.dtype = torch.float32,
) -> tuple[Path, Path]:
    """Write what `save_stage_delta` writes for a --dual-head stage (§2); returns (model_path, meta_path).

    `model_{step:06d}.pt`: exactly the 6·n+4 tensors of `ForkStage.delta_state_dict()` (no lm_head,
    no folded head, no base tensors), `transformer.wte.weight` in `embedding_dtype`, the rest float32.
    `meta_{step:06d}.json`: `fork_stage_meta(...)` (base_model_dir = the base TAG; no paths, no fingerprint).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = fork_stage_meta(stage, step, base_tag=base_tag, parent_stage_tag=parent_stage_tag,
                           parent_stage_step=parent_stage_step, model_step=model_step)
    state = {k: v.clone() for k, v in stage.delta_state_dict().items()}
    state["transformer.wte.weight"] = state["transformer.wte.weight"].to(embedding_dtype)
    model_path = directory / f"model_{step:06d}.pt"
    meta_path = directory / f"meta_{step:06d}.json"
    torch.save(state, model_path)
    meta_path.write_text(json.dumps(meta, indent=2))
    return model_path, meta_path
