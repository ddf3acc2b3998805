"""The PoE GPT: nanochat's trunk cut into stages, every stage boundary a next-token predictor.

One definition: training, every poelm decoder and `transformers` (modeling_poelm.py) run this file
and the pieces it imports (layers.py, head.py, kvcache.py). They import only torch, so they ship
unchanged as remote code; parameter names are nanochat's. One layer walk: `begin` -> `run_layers` ->
`readout` -> `predictor`, from which the forward and every decoder are built, so they cannot drift
apart. The design choices: docs/model.md §1-2 and §6.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .head import HeadCrossEntropy, at_least_float32, softcap
from .init_plan import init_plan
from .kvcache import KVCache
from .layers import Block, Embedding, Linear, block_shapes, norm, rotary_at, rotary_tables

if TYPE_CHECKING:  # the model reads its config by attribute; the type is documentation only
    from .config import PoEConfig


# The three additive heads are named in memory for what they are; on disk they keep the names the
# format has always used (docs/formats.md), translated where tensors meet files (`to_disk`/`from_disk`).
DISK_NAMES = {"stage_heads": "lm_head_stages", "specialist_head": "lm_head_stage", "ancestors_head": "lm_head_fold"}
_MEMORY_NAMES = {disk: memory for memory, disk in DISK_NAMES.items()}
SMEAR_IN = 24  # channels of the normed embedding the smear gate reads (config.SMEAR_CHANNELS)


def _renamed(key: str, names: dict) -> str:
    head, dot, rest = key.partition(".")
    return names.get(head, head) + dot + rest


def _rename(tensors: dict, names: dict) -> dict:
    return {_renamed(key, names): value for key, value in tensors.items()}


def disk_name(key: str) -> str:
    """A state-dict key under the name the files use."""
    return _renamed(key, DISK_NAMES)


def to_disk(tensors: dict) -> dict:
    """A state dict under the names the files use (`specialist_head.weight` -> `lm_head_stage.weight`)."""
    return _rename(tensors, DISK_NAMES)


def from_disk(tensors: dict) -> dict:
    """Tensors read from a file, under the model's own names."""
    return _rename(tensors, _MEMORY_NAMES)


# ---- the Product of Experts (docs/model.md §2): every caller combines stages through these --------------
def logop_score(stage_logits: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """The Log-OP's unnormalised score sum_k [w_k] log_softmax(logits_k), in float32 or wider: its argmax
    and top-1 margin are the Log-OP's, up to the 1/K**(1 - alpha) scale (what adaptive depth bounds);
    `weights` combine whole predictors (a composition of sibling stages)."""
    logps = (F.log_softmax(at_least_float32(l), dim=-1) for l in stage_logits)
    return sum(logps) if weights is None else sum(w * p for w, p in zip(weights, logps, strict=True))


def logop(stage_logits: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Log-OP (product of experts) of stage predictors, as log-probabilities:
    log_softmax(logop_score / K**(1 - alpha)); alpha = 0 is the geometric mean."""
    return logop_of_score(logop_score(stage_logits), len(stage_logits), alpha)


def logop_of_score(score: torch.Tensor, n_stages: int, alpha: float) -> torch.Tensor:
    """The Log-OP from its score over `n_stages` stages (a stage-parallel pipeline carries the score)."""
    return F.log_softmax(score / n_stages ** (1.0 - alpha), dim=-1)


def combine_stage_losses(losses: list, alpha: float, n_stages: int | None = None):
    """The training loss of local (`flat`, `residual_logop`) training: sum_k loss_k / K**(1 - alpha), K
    the model's number of stages (default: len(losses); a process holding some stages passes K)."""
    return sum(losses) / (len(losses) if n_stages is None else n_stages) ** (1.0 - alpha)


@dataclass
class Walk:
    """The residual stream of some positions after `layer` layers, with its positions (docs/model.md §2):
    idx (B, T); x, x0 (B, T, d) the residual and the normed embedding; x_backout the residual after
    `backout_layer` (None before it); cos, sin (B or 1, T, 1, D/2); doc_ids (B, Tk) the document of every
    key position up to the last (cached ones included), or None. Consecutive walks `cat` and `part`."""

    idx: torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor
    x_backout: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    doc_ids: torch.Tensor | None = None
    layer: int = 0

    @staticmethod
    def cat(walks: list["Walk"]) -> "Walk":
        """Walks of consecutive positions at the same layer, as one (along T)."""
        if len({w.layer for w in walks}) != 1:
            raise ValueError(f"cat: walks at different layers {[w.layer for w in walks]}")
        if len(walks) == 1:
            return walks[0]

        def join(name: str):
            parts = [getattr(w, name) for w in walks]
            return None if parts[0] is None else torch.cat(parts, dim=1)

        fields = {f.name: join(f.name) for f in dataclasses.fields(Walk) if f.name not in ("layer", "doc_ids")}
        return Walk(**fields, doc_ids=walks[-1].doc_ids, layer=walks[0].layer)  # the last covers every key

    def rows(self, start: int, stop: int) -> "Walk":
        """Rows [start, stop) of this walk (a view: rotary tables shared by every row stay shared)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        table = lambda t: t if t.size(0) == 1 else t[start:stop]  # noqa: E731
        return Walk(idx=cut(self.idx), x=cut(self.x), x0=cut(self.x0), x_backout=cut(self.x_backout),
                    cos=table(self.cos), sin=table(self.sin), doc_ids=cut(self.doc_ids), layer=self.layer)

    def part(self, start: int, stop: int) -> "Walk":
        """Positions [start, stop) of this walk (its doc_ids: the keys up to position stop - 1)."""
        cut = lambda t: None if t is None else t[:, start:stop]  # noqa: E731
        docs = None if self.doc_ids is None else self.doc_ids[:, : self.doc_ids.size(1) - (self.idx.size(1) - stop)]
        return Walk(idx=cut(self.idx), x=cut(self.x), x0=cut(self.x0), x_backout=cut(self.x_backout),
                    cos=cut(self.cos), sin=cut(self.sin), doc_ids=docs, layer=self.layer)


@dataclass
class PoEOutput:
    """What a forward returns.

    logits: (B, T, V) float32 of the requested predictor (inference), else None.
    loss: the training loss of `poe_mode` (targets given), else None.
    stage_losses: (K',) cross-entropy of each stage trained (targets given), still in the graph so a
        test can backpropagate one stage's loss alone; detach before logging.
    stage_logits: every computed stage's logits when `return_stages=True`.
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    stage_losses: torch.Tensor | None = None
    stage_logits: list[torch.Tensor] | None = None


def _check_fraction(fraction: float, flat_and_fused: bool) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"stage_loss_fraction={fraction}: expected a fraction in (0, 1]")
    if fraction < 1 and not flat_and_fused:
        raise ValueError("stage_loss_fraction < 1 applies to flat training with the fused loss")


def state_shapes(config: "PoEConfig") -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of `PoEGPT(config).state_dict()` with its shape, streamed without building anything:
    what a file's header is checked against first, so a config claiming 1000 layers costs no more."""
    V, d, kv = config.padded_vocab_size, config.n_embd, config.n_kv_head * config.head_dim
    ve_layers = set(config.value_embed_layers)
    yield "transformer.wte.weight", (V, d)
    for i in range(config.n_layer):
        for name, shape in block_shapes(config, i in ve_layers).items():
            yield f"transformer.h.{i}.{name}", shape
    yield "lm_head.weight", (V, d)
    if config.poe_stage_heads:
        for k in range(config.n_stages):
            yield f"stage_heads.{k}.weight", (V, d)
    if config.head_fold:
        yield "ancestors_head.weight", (V, d)
    if config.stage_head:
        yield "specialist_head.weight", (V, d)
    yield "resid_lambdas", (config.n_layer,)
    yield "x0_lambdas", (config.n_layer,)
    if config.smear:
        yield "smear_gate.weight", (1, SMEAR_IN)
        yield "smear_lambda", (1,)
    if config.backout:
        yield "backout_lambda", (1,)
    for i in sorted(ve_layers):
        yield f"value_embeds.{i}.weight", (V, kv)


def _own_table_in_state_dict(model: "PoEGPT", state: dict, prefix: str, local_metadata) -> None:
    """A model sharing its embedding table saves its own: the shared table with its own rows written in."""
    if model.own_row_ids is not None:
        table = state[prefix + "transformer.wte.weight"].clone()
        table[model.own_row_ids] = model.own_row_values
        state[prefix + "transformer.wte.weight"] = table


class PoEGPT(nn.Module):
    """nanochat's GPT with a next-token predictor at every stage boundary (docs/model.md §1-2)."""

    def __init__(self, config: "PoEConfig"):
        super().__init__()
        self.config = config
        V, d = config.padded_vocab_size, config.n_embd
        ve_layers = set(config.value_embed_layers)
        self.transformer = nn.ModuleDict({
            "wte": Embedding(V, d),
            "h": nn.ModuleList(Block(config, i, i in ve_layers) for i in range(config.n_layer)),
        })
        self.lm_head = Linear(d, V)
        if config.poe_stage_heads:  # optional per-stage additive heads, zero-initialised
            self.stage_heads = nn.ModuleDict({str(k): Linear(d, V) for k in range(config.n_stages)})
        if config.head_fold:  # the ancestors' specialist heads, folded into one (docs/model.md §3, chaining)
            self.ancestors_head = Linear(d, V)
        if config.stage_head:  # the leaf specialist's additive head, zero-initialised
            self.specialist_head = Linear(d, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = Linear(SMEAR_IN, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))  # no arithmetic: see Embedding
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, kv_dim) for i in sorted(ve_layers)})
        # Rows kept apart from a table shared with another model (`share_embedding`); None: none.
        self.register_buffer("own_row_ids", None, persistent=False)
        self.register_buffer("own_row_values", None, persistent=False)

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every tensor, in one place (init_plan.py, docs/model.md §1 table), from one explicit
        generator."""
        g = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for name, fill in init_plan(self.config):
            fill(self.get_parameter(name), g)

    # ---------------------------------------------------------------------------- pieces
    def token_embedding(self, idx: torch.Tensor) -> torch.Tensor:
        """The embedding-table rows of `idx` (B, T) -> (B, T, d), before the norm; the rows this model
        keeps apart from a shared table (`share_embedding`) replace the table's."""
        x = self.transformer.wte(idx)
        if self.own_row_ids is None:
            return x
        hit = idx.unsqueeze(-1) == self.own_row_ids  # (B, T, n): which own row each token is, if any
        own = self.own_row_values[hit.int().argmax(dim=-1)].to(x.dtype)
        return torch.where(hit.any(dim=-1, keepdim=True), own, x)

    @torch.no_grad()
    def share_embedding(self, table: torch.Tensor) -> int:
        """Read the token embedding from `table` (another model's table, same shape and dtype), keeping
        apart only the rows where this model's own table differs (a specialist's chat-token rows): the
        model computes exactly what it computed, holding n rows instead of a table. The state dict
        still gives this model's own table (rebuilt when saved). Returns the bytes no longer held."""
        own = self.transformer.wte.weight
        if own.shape != table.shape or own.dtype != table.dtype:
            raise ValueError(f"share_embedding: table {tuple(table.shape)} {table.dtype}, this model's "
                             f"{tuple(own.shape)} {own.dtype}")
        changed = (own.data != table).any(dim=1).nonzero().flatten()
        if self.own_row_ids is not None:
            raise ValueError("share_embedding: this model already shares its embedding table")
        self.own_row_ids, self.own_row_values = changed, own.data[changed].clone()
        own.data = table
        self.register_state_dict_post_hook(_own_table_in_state_dict)
        return (table.size(0) - len(changed)) * table.size(1) * table.element_size()

    def embed(self, idx: torch.Tensor, cache=None, doc_ids: torch.Tensor | None = None,
              tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Normed token embedding plus the smear of the previous token's embedding: (B, T, d).
        `doc_ids` (B, Tk) covers the cached positions and these. `tokens` (B, T, d): the table rows
        of `idx` when the caller looked them up (rows of a batch read from different models' tables,
        infer/fleet.py); else this model's `token_embedding(idx)`."""
        x = norm(self.token_embedding(idx) if tokens is None else tokens)
        if not self.config.smear:
            return x
        prev = x[:, :-1]
        if cache is not None:
            cached = cache.prev_embedding
            cache.prev_embedding = x[:, -1:]
            if cached is not None:  # continuing a cached sequence: position 0 has a predecessor
                prev = torch.cat([cached.to(x.dtype), prev], dim=1)
        if prev.size(1) == 0:
            return x
        start = x.size(1) - prev.size(1)  # 1 for a fresh sequence, 0 when the cache holds the predecessor
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, start:, :SMEAR_IN]))
        if doc_ids is not None:  # a document's first token has no predecessor to smear in (nor padding)
            first = doc_ids.size(1) - x.size(1) + start  # doc_ids covers the cache's positions too
            same = doc_ids[:, first:] == doc_ids[:, first - 1:-1]
            gate = gate * same.unsqueeze(-1).to(gate.dtype)
        return torch.cat([x[:, :start], x[:, start:] + gate * prev], dim=1)

    def stage_hidden(self, h: torch.Tensor, stage: int, x_backout: torch.Tensor | None) -> torch.Tensor:
        """The normed residual stage `stage` reads out from (backout subtracted where configured)."""
        if stage in self.config.poe_backout_stages:
            h = h - self.backout_lambda.to(h.dtype) * x_backout
        return norm(h)

    def heads(self, stage: int) -> list[Linear]:
        """The heads stage `stage` reads out through, summed: `lm_head` (+ `stage_heads[k]`), + `ancestors_head`
        on specialist stages, + `specialist_head` on a specialist's last stage (docs/model.md §3)."""
        c = self.config
        heads = [self.lm_head]
        if c.poe_stage_heads:
            heads.append(self.stage_heads[str(stage)])
        if c.head_fold and stage >= c.n_base_stages:
            heads.append(self.ancestors_head)
        if c.stage_head and stage == c.n_stages - 1:
            heads.append(self.specialist_head)
        return heads

    def head_weight(self, stage: int) -> torch.Tensor:
        """The stage's effective head weight (the sum of `heads(stage)`), for the fused loss."""
        heads = self.heads(stage)
        w = heads[0].weight
        for head in heads[1:]:
            w = w + head.weight
        return w

    def stage_logits(self, h: torch.Tensor, stage: int, x_backout: torch.Tensor | None) -> torch.Tensor:
        """Stage `stage`'s predictor from the residual after its last layer: (B, T, vocab) float32. The
        heads' logits are added (not their weights): zero extra heads give exactly the logits without them."""
        h = self.stage_hidden(h, stage, x_backout)
        heads = self.heads(stage)
        logits = heads[0](h)
        for head in heads[1:]:
            logits = logits + head(h)
        return softcap(logits[..., : self.config.vocab_size], self.config.softcap)

    def layer(self, i: int, x, x0, idx, cos, sin, cache=None, doc_ids=None) -> torch.Tensor:
        """Layer i: mix in the embedding (resid/x0 lambdas), then the block (with its value embedding)."""
        x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
        ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
        return self.transformer.h[i](x, ve, cos, sin, cache, doc_ids)

    # ------------------------------------------------------------------------- the layer walk
    @staticmethod
    def padding(attention_mask: torch.Tensor, cache, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A padded batch (`attention_mask` (B, T) or (B, Tk), 1 = real) as (doc_ids (B, Tk), positions
        (B, T)): real tokens document 0, padding -1, positions counting real tokens, so each row computes
        what it computes alone; (None, None) when nothing is hidden. The cache keeps the mask (§6)."""
        mask = attention_mask[:, -T:].bool()
        past = cache.get_seq_length() if cache is not None else 0
        stored = getattr(cache, "attention_mask", None) if cache is not None else None
        if stored is None and bool(mask.all()):
            return None, None  # nothing hidden, before or now: nothing to record either
        if past:
            if stored is None:
                stored = torch.ones(mask.size(0), past, dtype=torch.bool, device=mask.device)
            mask = torch.cat([stored, mask], dim=1)
        if cache is not None:
            cache.attention_mask = mask
        if bool(mask.all()):
            return None, None
        doc_ids = mask.long() - 1
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -T:]
        return doc_ids, positions

    def begin(self, idx: torch.Tensor, cache=None, doc_ids: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              tokens: torch.Tensor | None = None) -> Walk:
        """The walk of `idx` (B, T) before layer 0: embedding with the smear (continuing the cache's
        previous token), rotary tables at `positions` (B, T), else right after the cache's length.
        `attention_mask` (a padded batch) gives both (`padding`); packed documents give them directly.
        `tokens`: the embedding-table rows of `idx`, looked up by the caller (`embed`)."""
        c = self.config
        if attention_mask is not None:
            if doc_ids is not None or positions is not None:
                raise ValueError("give an attention_mask (padding) or doc_ids/positions (packing), not both")
            doc_ids, positions = self.padding(attention_mask, cache, idx.size(1))
        x = self.embed(idx, cache, doc_ids, tokens)
        if positions is not None:
            cos, sin = rotary_at(positions, c.head_dim, c.rope_base, x.dtype)
        else:
            start = cache.get_seq_length() if cache is not None else 0
            cos, sin = rotary_tables(start, idx.size(1), c.head_dim, c.rope_base, x.device, x.dtype)
        return Walk(idx=idx, x=x, x0=x, x_backout=None, cos=cos, sin=sin, doc_ids=doc_ids, layer=0)

    def run_layers(self, walk: Walk, stop: int, cache=None, *, detach_stages: bool = False,
                   frozen_layers: int = 0) -> Walk:
        """Carry `walk` through layers walk.layer .. stop-1 (writing each layer's keys and values into
        `cache`), recording the backout residual when its layer runs.

        Training rules: `detach_stages` detaches the residual where each stage after the first begins
        (local losses); `frozen_layers=n` runs layers below n without autograd and detaches what enters
        layer n (a frozen trunk).
        """
        c = self.config
        x, x0, x_backout = walk.x, walk.x0, walk.x_backout
        grad = torch.is_grad_enabled()
        starts = c.stage_starts[1:] if detach_stages else ()
        for i in range(walk.layer, stop):
            if i in starts:
                x = x.detach()  # local learning: stage k's layers learn only from their own loss
            if 0 < frozen_layers == i:  # the trunk's outputs enter the trained layers as constants
                x, x0 = x.detach(), x0.detach()
                x_backout = x_backout.detach() if x_backout is not None else None
            with torch.set_grad_enabled(grad and i >= frozen_layers):
                x = self.layer(i, x, x0, walk.idx, walk.cos, walk.sin, cache, walk.doc_ids)
            if i == c.backout_layer:
                x_backout = x
        return dataclasses.replace(walk, x=x, x0=x0, x_backout=x_backout, layer=max(stop, walk.layer))

    def _backout(self, walk: Walk, stage: int, detach: bool) -> torch.Tensor | None:
        """The backout residual stage `stage` subtracts; detached when it comes from an earlier stage
        and `detach` (local losses: no gradient back into another stage's layers)."""
        c = self.config
        if detach and walk.x_backout is not None and c.backout_layer < c.stage_starts[stage]:
            return walk.x_backout.detach()
        return walk.x_backout

    def _check_readout(self, walk: Walk, stage: int) -> None:
        if walk.layer != self.config.stage_ends[stage] + 1:
            raise ValueError(f"readout of stage {stage} needs the walk after layer {self.config.stage_ends[stage]}, "
                             f"it has run {walk.layer} layers")

    def readout(self, walk: Walk, stage: int, detach_backout: bool = False) -> torch.Tensor:
        """Stage `stage`'s logits (B, T, vocab) float32 from a walk that has just run its last layer."""
        self._check_readout(walk, stage)
        return self.stage_logits(walk.x, stage, self._backout(walk, stage, detach_backout))

    def readout_hidden(self, walk: Walk, stage: int, detach_backout: bool = False) -> torch.Tensor:
        """The normed residual stage `stage` reads out from (`readout` before its heads): what the fused
        loss (`fused_losses`) takes."""
        self._check_readout(walk, stage)
        return self.stage_hidden(walk.x, stage, self._backout(walk, stage, detach_backout))

    def rollback(self, cache, length: int | list[int], last_token) -> None:
        """Roll a decoding cache back to its first `length` positions (`cache.crop`), the smear's previous
        embedding set to that of `last_token` (B,), the token at position length - 1: the next token is
        computed as if nothing after it had been fed. One length per row needs a cache whose rows keep
        their own lengths (infer/cache.py)."""
        cache.crop(length)
        if self.config.smear:
            ids = torch.as_tensor(last_token, device=self.transformer.wte.weight.device).reshape(-1, 1)
            cache.prev_embedding = norm(self.token_embedding(ids))  # what `embed` keeps: (B, 1, d)

    def readout_stages(self, last: int, output: str | None = None) -> list[int]:
        """The stages whose logits `predictor` needs to decode stage `last` under `output`."""
        return list(range(last + 1)) if (output or self.config.poe_output) == "logop" else [last]

    def predictor(self, stage_logits: list[torch.Tensor], output: str | None = None) -> torch.Tensor:
        """What is decoded from the logits of `readout_stages(k, output)`: the last one
        (`output="last"`), or their Log-OP as log-probabilities (`"logop"`)."""
        output = output or self.config.poe_output
        return logop(stage_logits, self.config.poe_alpha) if output == "logop" else stage_logits[-1]

    # --------------------------------------------------------------------------- forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        exit_stage: int | None = None,
        output: str | None = None,
        return_stages: bool = False,
        loss_reduction: str = "mean",
        fused_loss: bool = True,
        loss_chunk: int | None = None,
        frozen_layers: int = 0,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stage_loss_fraction: float = 1.0,
    ) -> PoEOutput:
        """Run stages 0..exit_stage (default: all) on idx (B, T). Without targets: `logits`, the predictor
        `output` names (default `poe_output`). With targets (B, T), -1 = ignore: `loss` of `poe_mode` and
        `stage_losses`. Every option, and why: docs/model.md §6."""
        c = self.config
        last, output = c.last_stage(exit_stage), output or c.poe_output
        training = targets is not None
        mode = c.poe_mode if training else "none"
        fused = training and fused_loss and mode in ("none", "flat")
        _check_fraction(stage_loss_fraction, fused and mode == "flat")
        # Which boundaries need a predictor: all of them for local losses, Log-OP or return_stages.
        readouts = set(range(last + 1)) if return_stages or mode != "none" else set(self.readout_stages(last, output))
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_layers == 0):
            walk = self.begin(idx, cache, doc_ids, positions, attention_mask)
        read = self._read_stages(walk, last, readouts, cache, local=mode != "none", fused=fused,
                                 frozen_layers=frozen_layers)
        if not training:
            return PoEOutput(logits=self.predictor(read, output), stage_logits=read if return_stages else None)
        if not fused:
            return self._aggregate(self._stage_losses(read, targets, mode, loss_reduction), mode)
        stages = sorted(readouts)[-1:] if mode == "none" else sorted(readouts)
        hidden = read[-1:] if mode == "none" else read
        return self._aggregate(self.fused_losses(hidden, stages, targets, reduction=loss_reduction,
                                                 chunk=loss_chunk, fraction=stage_loss_fraction), mode)

    def _read_stages(self, walk: Walk, last: int, readouts: set[int], cache, *, local: bool, fused: bool,
                     frozen_layers: int) -> list[torch.Tensor]:
        """Walk stages 0..last; per stage in `readouts`, its logits, or (`fused`) its normed hidden."""
        read = []
        for k in range(last + 1):
            walk = self.run_layers(walk, self.config.stage_ends[k] + 1, cache, detach_stages=local,
                                   frozen_layers=frozen_layers)
            if k in readouts:
                read.append(self.readout_hidden(walk, k, local) if fused else self.readout(walk, k, local))
        return read

    def fused_losses(self, hidden: list[torch.Tensor], stages: list[int], targets: torch.Tensor, *,
                     reduction: str = "sum", chunk: int | None = None, fraction: float = 1.0,
                     exact: int | None = None) -> list[torch.Tensor]:
        """Each stage's cross-entropy from its normed read-out residual (`readout_hidden`) through
        HeadCrossEntropy, in chunks of `chunk` tokens: no full logit tensor is ever held. With `fraction`
        < 1 every stage but `exact` (default: the last of `stages`) scores a random subset of positions
        (docs/model.md §6). Stage-parallel training calls this with the stages one process owns."""
        c = self.config
        chunk = chunk or max(64, (1 << 22) // c.padded_vocab_size)
        exact = stages[-1] if exact is None else exact
        flat_targets = targets.reshape(-1)
        losses = []
        for k, h in zip(stages, hidden):
            h, t, scale = h.reshape(-1, h.size(-1)), flat_targets, 1.0
            if fraction < 1 and k != exact:
                n = math.ceil(fraction * len(t))
                keep = torch.randperm(len(t))[:n].to(t.device)  # the default CPU generator: checkpointed
                h, t, scale = h[keep], t[keep], len(flat_targets) / n
            total = HeadCrossEntropy.apply(h, self.head_weight(k), t, c.softcap, c.vocab_size, chunk) * scale
            if reduction == "mean":
                total = total / (flat_targets >= 0).sum()
            losses.append(total)
        return losses

    def _aggregate(self, losses: list[torch.Tensor], mode: str) -> PoEOutput:
        """The training loss of `mode` from per-stage losses (`combine_stage_losses`; `none`: the last)."""
        if mode == "none":
            return PoEOutput(loss=losses[-1], stage_losses=losses[-1].reshape(1))
        return PoEOutput(loss=combine_stage_losses(losses, self.config.poe_alpha), stage_losses=torch.stack(losses))

    def _stage_losses(self, logits, targets, mode, reduction) -> list[torch.Tensor]:
        """Cross-entropy per stage from materialised logits (the reference path, and residual_logop)."""
        V, alpha = self.config.vocab_size, self.config.poe_alpha
        flat_targets = targets.reshape(-1)

        def ce(l):
            return F.cross_entropy(l.reshape(-1, V), flat_targets, ignore_index=-1, reduction=reduction)

        if mode in ("none", "flat"):
            return [ce(l) for l in logits]
        logps, losses = [], []  # residual_logop: stage k is trained on the Log-OP of 0..k, earlier stages detached
        for k, l in enumerate(logits):
            logp = F.log_softmax(l, dim=-1)
            score = (sum(p.detach() for p in logps) + logp) / (k + 1) ** (1.0 - alpha)
            losses.append(ce(score))  # cross_entropy renormalises the score with logsumexp
            logps.append(logp)
        return losses

    # ---------------------------------------------------------------------------- counts
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_table(self) -> list[tuple[str, int]]:
        """Parameter counts per group, in the order a reader meets them (embedding, stages, head)."""
        c = self.config
        rows = [("wte", self.transformer.wte.weight.numel())]
        if len(self.value_embeds):
            rows.append(("value_embeds", sum(p.numel() for p in self.value_embeds.parameters())))
        for k, (a, b) in enumerate(zip(c.stage_starts, c.stage_ends)):
            n = sum(p.numel() for i in range(a, b + 1) for p in self.transformer.h[i].parameters())
            rows.append((f"stage {k} (layers {a}-{b})", n))
        rows.append(("lm_head", self.lm_head.weight.numel()))
        if c.poe_stage_heads:
            rows.append(("stage_heads", sum(p.numel() for p in self.stage_heads.parameters())))
        if c.head_fold:
            rows.append(("ancestors_head", self.ancestors_head.weight.numel()))
        if c.stage_head:
            rows.append(("specialist_head", self.specialist_head.weight.numel()))
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        scalars += (25 if c.smear else 0) + (1 if c.backout else 0)
        rows.append(("scalars", scalars))
        rows.append(("total", self.num_params()))
        return rows
