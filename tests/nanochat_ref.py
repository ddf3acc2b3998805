"""A plain reference implementation of the nanochat GPT, for parity tests only.

What it is
    An independent re-implementation of the GPT of the `nanochat` project (2026 vintage) as
    docs/model.md §1 specifies it, written in nanochat's own structure
    (`GPTConfig`, `CausalSelfAttention`, `MLP`, `Block`, `GPT`, `init_weights()`) and with
    nanochat's parameter names, so its `state_dict()` is a nanochat state dict. Beside the model:
    a writer for the files nanochat's `base_train` leaves behind (`model_NNNNNN.pt`,
    `meta_NNNNNN.json`), a reader for them, and `perturb_()`, which moves every parameter off its
    initial value so that a conversion test exercises every part of the network.

Why it is independent
    poelm must convert checkpoints written by nanochat into its own format with identical logits.
    nanochat itself cannot be installed here, so this file stands in for it: it is the other side
    of the parity test and therefore imports nothing from `poelm` (only torch and the standard
    library). A bug shared by both sides would go unseen, so this file is written from the
    specification, not from poelm's model code.

Design choices (simple and obviously correct, not fast)
    - Everything is float32. (nanochat computes in bf16 on GPU and keeps `wte`/`value_embeds`
      in bf16; `save_nanochat_checkpoint(embedding_dtype=torch.bfloat16)` reproduces that file
      layout, and the forward casts embedding lookups to float32 so bf16 weights also work.)
    - Attention is written out: an explicit boolean (T, T) mask for "causal within the window",
      an explicit `repeat_interleave` of the kv heads (query head h uses kv head
      h // (n_head // n_kv_head)), scores, softmax, weighted sum. No SDPA, no flash kernels.
    - The forward is an explicit loop over layers, numbered like docs/model.md §1.
    - Feature switches in `GPTConfig` (`smear`, `backout`, `value_embeds`, `lambdas`,
      `sliding_window`) build the OLDER nanochat variants: a switched-off feature has no tensors
      and no meta field (no `window_pattern` without sliding windows), exactly like an old
      checkpoint, so converter migrations can be tested. Switched off means the step is skipped,
      which equals the neutral values resid 1, x0 0, smear 0, backout 0, value embeds 0, window L.
    - Randomness is explicit: `init_weights(generator)` and `perturb_(model, generator)`.

The numbered forward (docs/model.md §1; norm = F.rms_norm over the last dim, no weight):
    1. x = norm(wte(idx))
    2. smear (t >= 1): x[t] += smear_lambda * sigmoid(smear_gate(x[t][:24])) * x[t-1], both
       operands taken from the pre-smear x
    3. x0 = x; for each layer i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0; x = block_i(x);
       after block n_layer // 2: x_backout = x
    4. block: x = x + attn(norm(x)); x = x + mlp(norm(x)); mlp = c_proj(relu(c_fc(x)) ** 2)
    5. attention: q, k, v; on VE layers v += 3 * sigmoid(ve_gate(x[..., :12])) * value_embeds[i](idx)
       (one gate per kv head); rotary (base 100000, y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos on
       the two halves of each head); QK RMS-norm; q, k *= 1.2; causal attention within the
       layer's window, scale 1/sqrt(head_dim), kv heads shared across query groups; c_proj
    6. VE layers: i % 2 == (n_layer - 1) % 2
    7. windows: window_pattern tiled over layers, L = sequence_len,
       S = -(-sequence_len // 4 // 128) * 128 (a quarter, rounded up to a multiple of 128),
       last layer always L; window W lets query i see keys j with i - W <= j <= i (W + 1 keys)
    8. x = x - backout_lambda * x_backout; x = norm(x);
       logits = 15 * tanh(lm_head(x)[..., :vocab_size].float() / 15)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F  # nothing from poelm: this is the independent side of a parity test

PAD_VOCAB_TO = 64  # wte / lm_head / value_embeds rows are padded to a multiple of this
VE_GATE_CHANNELS = 12  # ve_gate reads the first 12 channels of the normed block input
SMEAR_GATE_CHANNELS = 24  # smear_gate reads the first 24 channels of the normed embedding
ROPE_BASE = 100000
QK_SCALE = 1.2
SOFTCAP = 15.0
COMPILE_PREFIX = "_orig_mod."  # torch.compile'd modules save their keys under this prefix

# The GPTConfig fields nanochat itself has (and writes into meta["model_config"]).
NANOCHAT_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA)
    n_embd: int = 768
    window_pattern: str = "SSSL"
    # Feature switches for older nanochat variants (not nanochat config fields; an old checkpoint
    # simply lacks the tensors / the meta field).
    smear: bool = True
    backout: bool = True
    value_embeds: bool = True
    lambdas: bool = True
    sliding_window: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not (1 <= self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0):
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.smear and self.n_embd < SMEAR_GATE_CHANNELS:
            raise ValueError(f"smear needs n_embd >= {SMEAR_GATE_CHANNELS}, got {self.n_embd}")
        if self.value_embeds and self.n_embd < VE_GATE_CHANNELS:
            raise ValueError(f"value_embeds needs n_embd >= {VE_GATE_CHANNELS}, got {self.n_embd}")
        if self.sliding_window and (not self.window_pattern or set(self.window_pattern.upper()) - set("SL")):
            raise ValueError(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size)


def padded_vocab_size(vocab_size: int, multiple: int = PAD_VOCAB_TO) -> int:
    """vocab_size rounded up to a multiple of 64 (300 -> 320, 32768 -> 32768)."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value-embedding layers alternate and always include the last layer (docs/model.md §1, point 6)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def short_window(sequence_len: int) -> int:
    """The S window: a quarter of sequence_len rounded up to a multiple of 128 (nanochat's expression).

    Note the precedence: -(((-L) // 4) // 128) * 128, i.e. ceil(ceil(L / 4) / 128) * 128.
    2048 -> 512, 1024 -> 256, 512 -> 128, 256 -> 128.
    """
    long_window = sequence_len
    return -(-long_window // 4 // 128) * 128


def compute_window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer left window W (docs/model.md §1, point 7): pattern tiled, S/L mapped, last layer always L."""
    long_window = config.sequence_len
    if not config.sliding_window:
        return [long_window] * config.n_layer
    char_to_window = {"L": long_window, "S": short_window(config.sequence_len)}
    pattern = config.window_pattern.upper()
    windows = [char_to_window[pattern[i % len(pattern)]] for i in range(config.n_layer)]
    windows[-1] = long_window
    return windows


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim without a weight (torch's default eps)."""
    return F.rms_norm(x, (x.size(-1),))


def precompute_rotary(seq_len: int, head_dim: int, base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (1, seq_len, 1, head_dim/2), float32."""
    channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (channel_range / head_dim))  # (D/2,)
    t = torch.arange(seq_len, dtype=torch.float32)  # (T,)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (1, T, 1, D/2). Rotates the pair (x[:D/2], x[D/2:]) of each head."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = -x1 * sin + x2 * cos
    return torch.cat([y1, y2], dim=-1)


def window_mask(T: int, window: int) -> torch.Tensor:
    """(T, T) boolean, True where query i may attend to key j: i - window <= j <= i."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (j <= i) & (j >= i - window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        use_ve = config.value_embeds and has_ve(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if use_ve else None

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos_sin, window: int) -> torch.Tensor:
        """x (B, T, C) is the normed residual; ve (B, T, n_kv_head*D) or None."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, H, D)
        k = self.c_k(x).view(B, T, Hkv, D)
        v = self.c_v(x).view(B, T, Hkv, D)

        # Value embedding (ResFormer-style), one gate in (0, 3) per kv head.
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)

        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm over the head dim
        q, k = q * QK_SCALE, k * QK_SCALE

        # GQA, spelled out: query head h reads kv head h // (H // Hkv).
        group = H // Hkv
        k = k.repeat_interleave(group, dim=2)  # (B, T, H, D)
        v = v.repeat_interleave(group, dim=2)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
        mask = window_mask(T, window).to(scores.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        y = att @ v  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos_sin, window: int) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos_sin, window)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    """nanochat's GPT. Construction leaves placeholder values; call `init_weights()` (as nanochat does)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        Vp, d = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        self.window_sizes = compute_window_sizes(config)
        self.backout_layer = config.n_layer // 2
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(Vp, d),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(d, Vp, bias=False)
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        else:
            self.resid_lambdas = None
            self.x0_lambdas = None
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        else:
            self.smear_gate = None
            self.smear_lambda = None
        self.backout_lambda = nn.Parameter(0.2 * torch.ones(1)) if config.backout else None
        ve_layers = [i for i in range(config.n_layer) if config.value_embeds and has_ve(i, config.n_layer)]
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, kv_dim) for i in ve_layers})
        # Rotary tables: over-computed 10x like nanochat; non-persistent, so not in the state dict.
        cos, sin = precompute_rotary(config.sequence_len * 10, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every tensor initialised in one place, per the table in docs/model.md §1."""
        g = generator
        cfg = self.config
        d = cfg.n_embd
        s = math.sqrt(3) / math.sqrt(d)  # uniform bound with std 1/sqrt(d)
        self.transformer.wte.weight.normal_(0.0, 0.8, generator=g)
        self.lm_head.weight.normal_(0.0, 0.001, generator=g)
        for block in self.transformer.h:
            block.attn.c_q.weight.uniform_(-s, s, generator=g)
            block.attn.c_k.weight.uniform_(-s, s, generator=g)
            block.attn.c_v.weight.uniform_(-s, s, generator=g)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s, generator=g)
            block.mlp.c_proj.weight.zero_()
        if cfg.lambdas:
            denom = max(cfg.n_layer - 1, 1)
            for i in range(cfg.n_layer):
                self.resid_lambdas[i] = 1.15 - 0.10 * i / denom
                self.x0_lambdas[i] = 0.20 - 0.15 * i / denom
        if cfg.smear:
            self.smear_lambda.zero_()
            self.smear_gate.weight.uniform_(0.0, 0.02, generator=g)
        if cfg.backout:
            self.backout_lambda.fill_(0.2)
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-s, s, generator=g)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.uniform_(0.0, 0.02, generator=g)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Steps 1-2: the normed token embedding, smeared. idx (B, T) -> x0 (B, T, C)."""
        x = norm(self.transformer.wte(idx).float())  # 1.
        if self.config.smear and x.size(1) > 1:  # 2. both operands from the pre-smear x
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_GATE_CHANNELS]))  # (B, T-1, 1)
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        return x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab_size) float32."""
        B, T = idx.shape
        assert T <= self.cos.size(1), f"sequence length {T} exceeds the rotary table ({self.cos.size(1)})"
        cos_sin = self.cos[:, :T], self.sin[:, :T]

        x = self.embed(idx)  # steps 1-2
        x0 = x
        x_backout = None
        for i, block in enumerate(self.transformer.h):  # step 3
            if self.config.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).float() if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])  # steps 4-7
            if i == self.backout_layer:
                x_backout = x

        if self.config.backout:  # step 8
            x = x - self.backout_lambda * x_backout
        x = norm(x)
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The state dict nanochat writes for `config`, key -> shape, written out from the table of docs/model.md §1."""
    Vp, d, hd, L = config.padded_vocab_size, config.n_embd, config.head_dim, config.n_layer
    kv = config.n_kv_head * hd
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (Vp, d)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (config.n_head * hd, d)
        shapes[p + "attn.c_k.weight"] = (kv, d)
        shapes[p + "attn.c_v.weight"] = (kv, d)
        shapes[p + "attn.c_proj.weight"] = (d, d)
        if config.value_embeds and has_ve(i, L):
            shapes[p + "attn.ve_gate.weight"] = (config.n_kv_head, VE_GATE_CHANNELS)
        shapes[p + "mlp.c_fc.weight"] = (4 * d, d)
        shapes[p + "mlp.c_proj.weight"] = (d, 4 * d)
    shapes["lm_head.weight"] = (Vp, d)
    if config.value_embeds:
        for i in range(L):
            if has_ve(i, L):
                shapes[f"value_embeds.{i}.weight"] = (Vp, kv)
    if config.lambdas:
        shapes["resid_lambdas"] = (L,)
        shapes["x0_lambdas"] = (L,)
    if config.smear:
        shapes["smear_gate.weight"] = (1, SMEAR_GATE_CHANNELS)
        shapes["smear_lambda"] = (1,)
    if config.backout:
        shapes["backout_lambda"] = (1,)
    return shapes


@torch.no_grad()
def perturb_(model: GPT, generator: torch.Generator) -> GPT:
    """Move every parameter clearly off its init, deterministically, so a parity test sees every part.

    Zero-initialised projections get real weights, scalars get values far from their init,
    gates get spread-out weights, and lm_head is scaled up so logits reach the softcap's
    curved region. Every parameter must match one rule (a new one raises).
    """
    g = generator
    d = model.config.n_embd

    def randn(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=g, dtype=p.dtype)

    for name, p in model.named_parameters():
        fan_in = p.shape[-1]
        if name == "transformer.wte.weight" or name.startswith("value_embeds."):
            p.add_(0.2 * p.std() * randn(p))
        elif name.endswith(("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "mlp.c_fc.weight")):
            p.add_(0.2 * p.abs().max() * randn(p))
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):  # zero at init
            p.copy_(0.5 / math.sqrt(fan_in) * randn(p))
        elif name.endswith("attn.ve_gate.weight") or name == "smear_gate.weight":  # ~0 at init
            p.copy_(0.5 * randn(p))
        elif name == "lm_head.weight":  # std 0.001 at init: logits ~ N(0, 3^2) after this
            p.copy_(3.0 / math.sqrt(d) * randn(p))
        elif name in ("resid_lambdas", "x0_lambdas"):
            p.add_(0.1 * randn(p))
        elif name == "smear_lambda":  # 0 at init
            p.copy_(0.5 + 0.1 * randn(p))
        elif name == "backout_lambda":  # 0.2 at init
            p.copy_(0.35 + 0.05 * randn(p))
        else:
            raise KeyError(f"perturb_: no rule for parameter {name!r}")
    return model


def build_model(config: GPTConfig, seed: int = 0, perturb: bool = True) -> GPT:
    """A float32 CPU reference model: init_weights() then (by default) perturb_(), one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    model = GPT(config)
    model.init_weights(g)
    if perturb:
        perturb_(model, g)
    return model.eval()


@torch.no_grad()
def round_embeddings_(model: GPT, dtype: torch.dtype = torch.bfloat16) -> GPT:
    """Round wte and value_embeds through `dtype` in place (storage stays float32).

    A model rounded this way computes exactly what a checkpoint saved with
    `save_nanochat_checkpoint(..., embedding_dtype=dtype)` computes after loading.
    """
    for emb in [model.transformer.wte, *model.value_embeds.values()]:
        emb.weight.copy_(emb.weight.to(dtype).float())
    return model


def model_config_dict(config: GPTConfig) -> dict:
    """meta["model_config"] as nanochat writes it: its GPTConfig fields, window_pattern only with sliding windows."""
    out = {k: getattr(config, k) for k in NANOCHAT_CONFIG_FIELDS}
    if config.sliding_window:
        out["window_pattern"] = config.window_pattern
    return out


def save_nanochat_checkpoint(
    model: GPT,
    directory: str | Path,
    step: int,
    *,
    compile_prefix: bool = False,
    embedding_dtype: torch.dtype | None = None,
    extra_meta: dict | None = None,
) -> tuple[Path, Path]:
    """Write nanochat's base_train files: `model_{step:06d}.pt` and `meta_{step:06d}.json`.

    The .pt file is `torch.save(state_dict)` (the format poelm converts FROM; read it back only
    with `torch.load(..., weights_only=True)`). compile_prefix=True prefixes every key with
    `_orig_mod.` as a torch.compile'd model's state dict does. embedding_dtype (e.g. bf16) stores
    wte and value_embeds in that dtype, as nanochat does on GPU. extra_meta adds keys to the meta
    JSON (nanochat writes more, e.g. user_config and loop_state; a reader must ignore them).
    Returns (model_path, meta_path).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if embedding_dtype is not None and (key == "transformer.wte.weight" or key.startswith("value_embeds.")):
            tensor = tensor.to(embedding_dtype)
        state[(COMPILE_PREFIX if compile_prefix else "") + key] = tensor
    model_path = directory / f"model_{step:06d}.pt"
    meta_path = directory / f"meta_{step:06d}.json"
    torch.save(state, model_path)
    meta = {"step": step, "model_config": model_config_dict(model.config), "val_bpb": 1.0}
    meta.update(extra_meta or {})
    meta_path.write_text(json.dumps(meta, indent=2))
    return model_path, meta_path


def load_nanochat_checkpoint(directory: str | Path, step: int | None = None) -> tuple[GPT, dict]:
    """Read a checkpoint written by `save_nanochat_checkpoint` back into a float32 reference GPT.

    step=None takes the highest step in the directory. The feature switches are inferred from
    what the files hold (an old checkpoint lacks tensors / window_pattern); the load is strict.
    Returns (model in eval mode, meta dict).
    """
    directory = Path(directory)
    if step is None:
        steps = [int(m.group(1)) for p in directory.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name))]
        if not steps:
            raise FileNotFoundError(f"no model_NNNNNN.pt in {directory}")
        step = max(steps)
    meta = json.loads((directory / f"meta_{step:06d}.json").read_text())
    state = torch.load(directory / f"model_{step:06d}.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix(COMPILE_PREFIX): v.float() for k, v in state.items()}
    mc = meta["model_config"]
    config = GPTConfig(
        **{k: mc[k] for k in NANOCHAT_CONFIG_FIELDS},
        window_pattern=mc.get("window_pattern", "L"),
        smear="smear_gate.weight" in state,
        backout="backout_lambda" in state,
        value_embeds=any(k.startswith("value_embeds.") for k in state),
        lambdas="resid_lambdas" in state,
        sliding_window="window_pattern" in mc,
    )
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), meta
