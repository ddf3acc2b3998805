"""`poelm specialist train`: supervised fine-tuning of a specialist stage on conversations.

A recipe of the shared skeleton (recipe.py: setup -> fit -> save over TrainLoop); what is its own:
- setup: the stage directory's chain assembled, everything but the leaf stage frozen and the parent's
  layers run without autograd; conversations read, mixed (validation held out before repetition),
  rendered with the chat format and packed best-fit into rows with document masking.
- fit: cross-entropy on assistant tokens only, over the step's supervised tokens; every evaluation
  checks that the base path is still bit-identical (max |Δlogit| 0.0, or the run stops).
- save: `final/` and `best/` (lowest val bpb of the stage) as stage directories on the parent, their
  deltas stored in `--save-dtype` (default: the stage directory's dtype). Training runs on float32
  master weights whatever the stored dtype (a bfloat16 chain is upcast once when placed); the parent
  is compared in its own dtype when the delta is cut, so its tensors stay its own bit for bit.
docs/training.md, "Stage SFT", has the details.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from .. import models
from ..common.atomic import chain_inputs
from ..common.options import free_on_resume, option, run_record
from ..core.errors import PoelmError
from ..core.files import CONFIG
from ..data.mixture import build_mixture
from ..data.packing import ChatLoader, eval_batches, pack, render_conversations
from ..data.sources import SPEC_INPUTS, load_conversations, parse_spec
from ..eval.bpb import bpb_from_sums, bpb_sums
from ..models.directory import STORAGE_DTYPES, storage_dtype
from ..models.specialist import freeze_for_specialist, save_specialist
from .dist import Dist, all_reduce_sum, data_parallel, log0, run_distributed
from .flops import training_flops_per_token
from .loop import LoopConfig, LoopResult, RunArgs
from .optim import build_optimizer
from .recipe import (Export, Setup, batch_geometry, cadence_row, check_run_dir, record_run, resolve_seq_len,
                     run_rows, train)


@dataclass(kw_only=True)
class StageTrainArgs(RunArgs):
    """`poelm specialist train`'s arguments (options.py: each option field is a flag, and run.json records it)."""

    stage: str = option(help="the stage directory to train", positional=True, metavar="STAGEDIR", resume=None)
    data: list[str] = option(help=f"PATH[:EPOCHS]: {SPEC_INPUTS}, of conversations (messages, ShareGPT, Alpaca, "
                                  "Evol-Instruct, Magicoder)", metavar="SPEC")
    steps: int | None = option(None, "optimizer steps (or --epochs)", resume=None)  # recorded as resolved
    epochs: float | None = option(None, "passes over the (repeated) training mixture (or --steps)", resume=None)
    val_conversations: int = option(512, "held out before repetition")
    seq_len: int | None = option(None, "row length (default: the model's sequence_len)", resume=None)
    eval_every: int = option(200, "evaluation cadence in steps", resume="free")
    warmup_frac: float = option(0.05, "share of steps warming up")
    warmdown_frac: float = option(0.9, "share of steps warming down")
    stage_head_lr: float = option(1e-4, "AdamW LR of the stage head")
    stage_head_weight_decay: float = option(0.1, "AdamW weight decay of the stage head")
    label_smoothing: float = option(0.0, "label smoothing of the assistant-token loss")
    end_token_weight: float = option(1.0, "loss weight of <|assistant_end|>")
    case_augment: bool = option(False, "duplicate greetings with their case perturbed")
    skip_invalid: bool = option(False, "skip bad records (counted per file and reason)", resume=None)
    document_masking: bool = option(True, "let packed conversations see each other (--no-document-masking)")
    train_chat_rows: bool = option(False, "also train the chat tokens' embedding rows")
    save_dtype: str | None = option(None, "the dtype final/ and best/ store their deltas in (default: the stage "
                                    "directory's); training keeps float32 master weights", choices=STORAGE_DTYPES,
                                    resume="free")
    extra: dict[str, Any] = field(default_factory=dict)


def stage_train(args: StageTrainArgs) -> dict[str, Any]:
    return run_distributed(args.device, train, StageTrain(args))


class StageTrain:
    """Stage SFT's part of the skeleton (recipe.py): its inputs, setup, loss, evaluation and export."""

    def __init__(self, args: StageTrainArgs):
        if (args.steps is None) == (args.epochs is None):
            raise PoelmError("give exactly one of --steps and --epochs")
        self.args = args

    def inputs(self) -> list[tuple[str, str]]:
        return chain_inputs(self.args.stage, "stage") + [("data", parse_spec(s)[0]) for s in self.args.data]

    def setup(self, d: Dist) -> Setup:
        """The chain and its leaf stage, the conversations, the steps; the run folder; the stage placed."""
        args, self.d = self.args, d
        self.chain = models.open(args.stage)  # the stage and its whole chain, checked once
        stage = self.chain.links[-1]
        if not stage.is_stage:
            raise PoelmError(f"{stage.path / CONFIG}: not a stage directory (attach one with "
                             "`poelm specialist attach`)")
        self.model, self.tok = self.chain.model(), self.chain.tokenizer()
        config = self.config = self.model.config
        seq_len = self.seq_len = resolve_seq_len(args.seq_len, config.sequence_len)
        world = d.world_size
        tokens_per_step, accum = batch_geometry(args.device_batch_size, args.total_batch_tokens, seq_len, world)
        self.tokens_per_step = tokens_per_step
        self._conversations(d)
        rows_per_step = args.device_batch_size * world * accum
        steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * self.train_rows.n_rows
                                                                         / rows_per_step))
        run_dir = Path(args.out)
        recorded = {"command": "stage train", **run_record(args), "stage": str(Path(args.stage).resolve()),
                    "steps": steps, "seq_len": seq_len, "total_batch_tokens": tokens_per_step}
        ckpt = check_run_dir(run_dir, recorded, args.resume, ignore=free_on_resume(StageTrainArgs))
        if ckpt is None:
            record_run(d, run_dir, recorded)
        flops, parts = self._place(d)
        log0(d, f"stage: {config.poe_stage_layers[-1]} blocks on {config.n_layer - config.poe_stage_layers[-1]} "
                f"frozen layers; {sum(p.numel() for p in self.model.parameters() if p.requires_grad):,} trainable "
                f"parameters; {self.train_rows.n_rows:,} train rows, {self.val_rows.n_rows:,} val rows of {seq_len} "
                f"tokens; {steps} steps of {tokens_per_step:,} tokens = {args.device_batch_size} x {seq_len} x "
                f"{world} x {accum}")
        cfg = LoopConfig(args, steps, accum, tokens_per_step, "stage", flops_per_token=flops,
                         title=f"{run_dir.name}: val bpb on assistant tokens")
        return Setup(ckpt=ckpt, cfg=cfg, **parts)

    def _conversations(self, d: Dist) -> None:
        """The conversations read, mixed (validation held out before repetition), rendered and packed."""
        args, tok = self.args, self.tok
        sources, report = load_conversations(args.data, skip_invalid=args.skip_invalid)
        self.mixture = build_mixture(sources, args.val_conversations, args.seed, case_augment=args.case_augment)
        log0(d, self.mixture.summary())
        if args.val_conversations < 1:
            raise PoelmError(f"--val-conversations {args.val_conversations}: the run needs held-out conversations "
                             "to measure val bpb and choose best/")
        self.train_rows = pack(render_conversations(self.mixture.train, tok), self.seq_len, tok.bos_id)
        self.val_rows = pack(render_conversations(self.mixture.val, tok), self.seq_len, tok.bos_id)
        log0(d, f"packed: train {self.train_rows.stats.summary()}; val {self.val_rows.stats.summary()}")

    def _place(self, d: Dist) -> tuple[float, dict[str, Any]]:
        """The leaf stage the only trainable part (and its FLOPs per token), on its device, with its optimizer,
        loader and callbacks; the base path's logits on fixed inputs, which every evaluation must find unchanged."""
        args, model, config, tok = self.args, self.model, self.config, self.tok
        rows = self.stage_data.get("chat_rows") or None
        partial = freeze_for_specialist(model, rows if args.train_chat_rows else None)
        # chat rows learn only through the trunk's backward; else the parent's layers run without autograd
        self.frozen = 0 if args.train_chat_rows else config.n_layer - config.poe_stage_layers[-1]
        fused = args.label_smoothing == 0 and args.end_token_weight == 1  # `loss`: the last stage's head only
        last = config.n_stages - 1
        flops = training_flops_per_token(model, self.seq_len, frozen_layers=self.frozen,
                                         readouts={k: 1.0 for k in ([last] if fused else model.readout_stages(last))})
        model.to(d.device, torch.float32)  # float32 master weights, whatever the stored dtype
        optimizer = build_optimizer(model, matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr,
                                    weight_decay=args.weight_decay, stage_head_lr=args.stage_head_lr,
                                    stage_head_weight_decay=args.stage_head_weight_decay, no_decay=set(partial))
        ddp_model = data_parallel(d, model)
        loader = ChatLoader(self.train_rows, args.device_batch_size, rank=d.rank, world_size=d.world_size,
                            seed=args.seed)
        self.end_id = tok.token_id("<|assistant_end|>")
        self.token_bytes = torch.tensor(tok.token_bytes, dtype=torch.int64)
        self.probe = preservation_inputs(tok, min(self.seq_len, 96))
        with torch.no_grad():
            self.base_logits = model(self.probe.to(d.device), exit_stage=config.n_base_stages - 1).logits
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return flops, dict(model=model, ddp_model=ddp_model, optimizer=optimizer, loader=loader, loss_fn=self.loss,
                           evaluate=self.evaluate, trainable=lambda: {n: model.get_parameter(n) for n in names})

    @property
    def stage_data(self) -> dict[str, Any]:
        """The leaf stage's config (its chat rows, name and parent overrides)."""
        return self.chain.links[-1].data

    def loss(self, m: torch.nn.Module, x, y, doc, pos) -> tuple[torch.Tensor, torch.Tensor]:
        args = self.args
        masking = {"doc_ids": doc, "positions": pos} if args.document_masking else {}
        if args.label_smoothing == 0 and args.end_token_weight == 1:
            out = m(x, targets=y, loss_reduction="sum", frozen_layers=self.frozen, **masking)
            return out.loss, out.stage_losses
        logits = m(x, frozen_layers=self.frozen, **masking).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                              reduction="none", label_smoothing=args.label_smoothing)
        weights = torch.where(y.reshape(-1) == self.end_id, args.end_token_weight, 1.0)
        total = (nll * weights).sum()
        return total, total.detach().reshape(1)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Val bpb of every predictor on assistant tokens; the base path must be bit-identical."""
        args, d, model, config = self.args, self.d, self.model, self.config
        batches = eval_batches(self.val_rows, args.device_batch_size, rank=d.rank, world_size=d.world_size)
        if not args.document_masking:
            batches = ((b[0], b[1]) for b in batches)
        names, sums = bpb_sums(model, batches, self.token_bytes, d.device)
        bpb = bpb_from_sums(names, all_reduce_sum(d, sums))
        with torch.no_grad():
            now = model(self.probe.to(d.device), exit_stage=config.n_base_stages - 1).logits
        diff = 0.0 if torch.equal(now, self.base_logits) else float((now - self.base_logits).abs().max())
        if diff != 0.0:
            raise PoelmError(f"step {step}: the base path changed (max |Δlogit| = {diff}); a stage must leave "
                             "its parent bit-identical")
        val = {"stage": bpb[f"stage{config.n_stages - 1}"], "base": bpb[f"stage{config.n_base_stages - 1}"]}
        return {"val_bpb": val, "val_bpb_all": bpb, "preservation_max_abs_diff": diff}

    def export(self, d: Dist, exports: Iterable[Export], result: LoopResult) -> dict[str, Any]:
        """`final/` and `best/` as stage directories on the original parent, with the seed card's tables."""
        args, run_dir, evals = self.args, Path(self.args.out), result.evals
        cpu = self.model.to("cpu")
        training = training_rows(args, self.mixture, self.train_rows, self.seq_len, self.tokens_per_step,
                                 d.world_size, result)
        name = self.stage_data.get("stage_name", self.chain.links[-1].path.name)
        parent = models.open(self.chain.links[-2].path)  # what final/ and best/ are deltas against
        for which, weights, step in exports:
            with torch.no_grad():
                for n, v in weights.items():
                    cpu.get_parameter(n).copy_(v)
            save_specialist(cpu, parent, run_dir / which, name, overwrite=True,
                            dtype=storage_dtype(args.save_dtype, self.chain.links[-1].dtype),
                            allow_parent_overrides=bool(self.stage_data.get("parent_overrides")),
                            card_kw={"training": training + [("Exported step", step)], "evals": evals,
                                     "best_step": result.best_step, "best_key": "stage"},
                            extra_config={"training": {"run_dir": str(run_dir), "step": step}})
        log0(d, f"done: {result.step} steps in {result.seconds:.0f}s; best stage val bpb {result.best_value:.4f} "
                f"at step {result.best_step}; base path preserved exactly; exported {run_dir / 'final'} and "
                f"{run_dir / 'best'}")
        return {"val_bpb": [[e["step"], e["val_bpb"]["stage"]] for e in evals],
                "preservation_max_abs_diff": max(e["preservation_max_abs_diff"] for e in evals)}


def preservation_inputs(tok, length: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Fixed inputs without chat tokens: the base path must give the base's logits on them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, tok.n_merges, (n, length), generator=g)
    x[:, 0] = tok.bos_id
    return x


def training_rows(args: StageTrainArgs, mixture, train_rows, seq_len, tokens_per_step, world, result):
    return [
        ("Objective", "cross-entropy over assistant turns only (user turns and padding masked out)"
         + (f", label smoothing {args.label_smoothing}" if args.label_smoothing else "")
         + (f", <|assistant_end|> weight {args.end_token_weight}" if args.end_token_weight != 1 else "")),
        ("Data", "; ".join(args.data)),
        ("Conversations (train after repetition / held-out val)", f"{len(mixture.train):,} / {len(mixture.val):,}"),
        ("Case augmentation", "yes" if args.case_augment else "no"),
        ("Packing", f"best-fit into {train_rows.n_rows:,} rows of {seq_len}; document masking "
                    f"{'on' if args.document_masking else 'off'}"),
        *run_rows(args, seq_len, tokens_per_step, world, result.step),
        ("Optimizer", f"MuonAdamW (new blocks Muon LR {args.matrix_lr}; lambdas AdamW)"),
        ("lm_head_stage LR", f"{args.stage_head_lr}, weight decay {args.stage_head_weight_decay}"),
        ("Warmup / warmdown", f"{args.warmup_frac:.0%} / {args.warmdown_frac:.0%}"),
        cadence_row(args),
        ("Best checkpoint", f"step {result.best_step}, val bpb {result.best_value:.4f}"),
    ]

