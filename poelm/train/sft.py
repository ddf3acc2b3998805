"""`poelm stage train`: supervised fine-tuning of a specialist stage on conversations.

setup -> fit -> save, over the same TrainLoop as pretraining (loop.py: accumulation, schedule,
evaluation, metrics, checkpoints, resume, DDP):
- setup: the stage directory's chain is assembled; everything but the leaf stage is frozen
  (`freeze_for_specialist`), the parent's layers run without autograd (`frozen_layers`); conversations are
  read in any supported shape, mixed (each source repeated EPOCHS times; the validation
  conversations are held out of the shuffled pool before repetition), rendered with the chat format,
  and packed best-fit into rows with document masking.
- fit: cross-entropy on assistant tokens only (the chat mask), as the mean over the supervised
  tokens of the optimizer step; optional label smoothing and a weight on `<|assistant_end|>`. The
  stage head is its own AdamW group (LR 1e-4, weight decay 0.1 by default), the new blocks Muon.
  Every evaluation reports the val bpb of every predictor on assistant tokens and checks that the
  base path is still bit-identical (max |Δlogit| must be 0.0, or the run stops with an error).
- save: `final/` and `best/` (lowest val bpb of the stage) are exported as stage directories on the
  original parent, with the seed card's tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.cascade import open_chain
from ..core.files import CONFIG
from ..data.chat import (ChatLoader, build_mixture, eval_batches, load_conversations, pack, parse_spec,
                         render_conversations)
from ..core.errors import PoelmError
from ..eval.bpb import bpb_from_sums, bpb_sums
from .optim import build_optimizer
from ..common.options import free_on_resume, option, run_record
from ..common.atomic import chain_inputs, check_output
from ..models.specialist import freeze_for_specialist, save_specialist
from .dist import Dist, all_reduce_sum, log0, run_distributed
from .loop import LoopConfig, RunArgs, TrainLoop, batch_geometry, check_run_dir, record_run, resolve_seq_len
from .metrics import training_flops_per_token
from .trackers import check_report_to


@dataclass(kw_only=True)
class StageTrainArgs(RunArgs):
    """`poelm stage train`'s arguments (options.py: each option field is a flag, and run.json records it)."""

    stage: str = option(help="the stage directory to train", positional=True, metavar="STAGEDIR", resume=None)
    data: list[str] = option(help="PATH[:EPOCHS]: JSONL file or directory of them (messages, Alpaca, Magicoder, "
                                  "ShareGPT)", metavar="SPEC")
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
    extra: dict[str, Any] = field(default_factory=dict)


def stage_train(args: StageTrainArgs) -> dict[str, Any]:
    return run_distributed(args.device, _stage_train, args)


def _stage_train(d: Dist, args: StageTrainArgs) -> dict[str, Any]:
    # ---------------------------------------------------------------------------------- setup
    if (args.steps is None) == (args.epochs is None):
        raise PoelmError("give exactly one of --steps and --epochs")
    report_to = check_report_to(args.report_to)  # a missing tracker package: one line, before any work
    torch.manual_seed(args.seed)
    # The run folder holds checkpoints (resume) and final/ + best/: never inside or around an input.
    check_output(args.out, chain_inputs(args.stage, "stage") + [("data", parse_spec(s)[0]) for s in args.data],
                 overwrite=True)
    chain = open_chain(args.stage)  # the stage and its whole chain, checked once
    stage = chain.links[-1]
    if not stage.is_stage:
        raise PoelmError(f"{stage.path / CONFIG}: not a stage directory (attach one with `poelm stage attach`)")
    model = chain.model()
    config = model.config
    tok = chain.tokenizer()
    seq_len = resolve_seq_len(args.seq_len, config.sequence_len)
    world = d.world_size
    tokens_per_step, accum = batch_geometry(args.device_batch_size, args.total_batch_tokens, seq_len, world)
    sources, report = load_conversations(args.data, skip_invalid=args.skip_invalid)
    mixture = build_mixture(sources, args.val_conversations, args.seed, case_augment=args.case_augment)
    log0(d, mixture.summary())
    if args.val_conversations < 1:
        raise PoelmError(f"--val-conversations {args.val_conversations}: the run needs held-out conversations "
                         "to measure val bpb and choose best/")
    train_rows = pack(render_conversations(mixture.train, tok), seq_len, tok.bos_id)
    val_rows = pack(render_conversations(mixture.val, tok), seq_len, tok.bos_id)
    log0(d, f"packed: train {train_rows.stats.summary()}; val {val_rows.stats.summary()}")
    rows_per_step = args.device_batch_size * world * accum
    steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * train_rows.n_rows / rows_per_step))
    run_dir = Path(args.out)
    recorded = {"command": "stage train", **run_record(args), "stage": str(Path(args.stage).resolve()),
                "steps": steps, "seq_len": seq_len, "total_batch_tokens": tokens_per_step}
    ckpt = check_run_dir(run_dir, recorded, args.resume, ignore=free_on_resume(StageTrainArgs))
    if ckpt is None:
        record_run(d, run_dir, recorded)
    first = config.n_layer - config.poe_stage_layers[-1]
    rows = stage.data.get("chat_rows") or None
    partial = freeze_for_specialist(model, rows if args.train_chat_rows else None)
    frozen = 0 if args.train_chat_rows else first  # chat rows learn only through the trunk's backward
    fused = args.label_smoothing == 0 and args.end_token_weight == 1  # loss_fn below: the last stage's head only
    flops_per_token = training_flops_per_token(
        model, seq_len, frozen_layers=frozen,
        readouts={k: 1.0 for k in ([config.n_stages - 1] if fused else model.readout_stages(config.n_stages - 1))})
    model.to(d.device)
    optimizer = build_optimizer(model, matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr,
                                weight_decay=args.weight_decay, stage_head_lr=args.stage_head_lr,
                                stage_head_weight_decay=args.stage_head_weight_decay, no_decay=set(partial))
    ddp_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    loader = ChatLoader(train_rows, args.device_batch_size, rank=d.rank, world_size=world, seed=args.seed)
    log0(d, f"stage: {config.poe_stage_layers[-1]} blocks on {first} frozen layers; "
            f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters; "
            f"{train_rows.n_rows:,} train rows, {val_rows.n_rows:,} val rows of {seq_len} tokens; {steps} steps of "
            f"{tokens_per_step:,} tokens = {args.device_batch_size} x {seq_len} x {world} x {accum}")

    end_id = tok.token_id("<|assistant_end|>")
    token_bytes = torch.tensor(tok.token_bytes, dtype=torch.int64)
    K = config.n_stages
    probe = preservation_inputs(tok, min(seq_len, 96))
    with torch.no_grad():
        base_logits = model(probe.to(d.device), exit_stage=config.n_base_stages - 1).logits

    def masking(doc, pos):
        return {"doc_ids": doc, "positions": pos} if args.document_masking else {}

    def loss_fn(m, x, y, doc, pos):
        if args.label_smoothing == 0 and args.end_token_weight == 1:
            out = m(x, targets=y, loss_reduction="sum", frozen_layers=frozen, **masking(doc, pos))
            return out.loss, out.stage_losses
        logits = m(x, frozen_layers=frozen, **masking(doc, pos)).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                              reduction="none", label_smoothing=args.label_smoothing)
        weights = torch.where(y.reshape(-1) == end_id, args.end_token_weight, 1.0)
        total = (nll * weights).sum()
        return total, total.detach().reshape(1)

    def evaluate(step: int) -> dict[str, Any]:
        batches = eval_batches(val_rows, args.device_batch_size, rank=d.rank, world_size=world)
        if not args.document_masking:
            batches = ((b[0], b[1]) for b in batches)
        names, sums = bpb_sums(model, batches, token_bytes, d.device)
        bpb = bpb_from_sums(names, all_reduce_sum(d, sums))
        with torch.no_grad():
            now = model(probe.to(d.device), exit_stage=config.n_base_stages - 1).logits
        diff = 0.0 if torch.equal(now, base_logits) else float((now - base_logits).abs().max())
        if diff != 0.0:
            raise PoelmError(f"step {step}: the base path changed (max |Δlogit| = {diff}); a stage must leave "
                             "its parent bit-identical")
        val = {"stage": bpb[f"stage{K - 1}"], "base": bpb[f"stage{config.n_base_stages - 1}"]}
        return {"val_bpb": val, "val_bpb_all": bpb, "preservation_max_abs_diff": diff}

    loop_cfg = LoopConfig(
        run_dir=run_dir, steps=steps, accum_steps=accum, tokens_per_step=tokens_per_step,
        eval_every=args.eval_every, save_every=args.save_every or args.eval_every,
        warmup_frac=args.warmup_frac, warmdown_frac=args.warmdown_frac, final_lr_frac=args.final_lr_frac,
        best_key="stage", resume=args.resume, title=f"{run_dir.name}: val bpb on assistant tokens",
        flops_per_token=flops_per_token, report_to=report_to)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    loop = TrainLoop(d, loop_cfg, model=model, ddp_model=ddp_model, optimizer=optimizer, loader=loader,
                     loss_fn=loss_fn, evaluate=evaluate,
                     trainable=lambda: {n: model.get_parameter(n) for n in trainable_names},
                     count_fn=lambda y: int((y >= 0).sum()))

    # ------------------------------------------------------------------------------------ fit
    result = loop.fit(ckpt)

    # ----------------------------------------------------------------------------------- save
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": result.step, "best_step": result.best_step,
                               "best_val_bpb": result.best_value}
    if d.is_main:
        evals = result.evals
        cpu = model.to("cpu")
        final = {n: cpu.get_parameter(n).detach().clone() for n in trainable_names}
        training = training_rows(args, mixture, train_rows, seq_len, tokens_per_step, world, result)
        name = stage.data.get("stage_name", stage.path.name)
        parent = open_chain(chain.links[-2].path)  # what final/ and best/ are deltas against
        for which, weights, step in (("final", final, result.step), ("best", loop.best_weights(), result.best_step)):
            with torch.no_grad():
                for n, v in weights.items():
                    cpu.get_parameter(n).copy_(v)
            save_specialist(cpu, parent, run_dir / which, name, overwrite=True,
                            allow_parent_overrides=bool(stage.data.get("parent_overrides")),
                       card_kw={"training": training + [("Exported step", step)], "evals": evals,
                                "best_step": result.best_step, "best_key": "stage"},
                       extra_config={"training": {"run_dir": str(run_dir), "step": step}})
        summary["val_bpb"] = [[e["step"], e["val_bpb"]["stage"]] for e in evals]
        summary["preservation_max_abs_diff"] = max(e["preservation_max_abs_diff"] for e in evals)
        log0(d, f"done: {result.step} steps in {result.seconds:.0f}s; best stage val bpb {result.best_value:.4f} "
                f"at step {result.best_step}; base path preserved exactly; exported {run_dir / 'final'} and "
                f"{run_dir / 'best'}")
    return summary


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
        ("Sequence length", seq_len), ("Per-device batch", f"{args.device_batch_size} x {seq_len}"),
        ("World size", world), ("Tokens per step", f"{tokens_per_step:,}"), ("Steps", result.step),
        ("Optimizer", f"MuonAdamW (new blocks Muon LR {args.matrix_lr}; lambdas AdamW)"),
        ("lm_head_stage LR", f"{args.stage_head_lr}, weight decay {args.stage_head_weight_decay}"),
        ("Warmup / warmdown", f"{args.warmup_frac:.0%} / {args.warmdown_frac:.0%}"),
        ("Eval / save cadence", f"every {args.eval_every} / {args.save_every or args.eval_every} steps"),
        ("Best checkpoint", f"step {result.best_step}, val bpb {result.best_value:.4f}"),
    ]

