"""`poelm pretrain`: train a PoE base (or its backprop control) on text, one process or many.

A recipe of the shared skeleton (recipe.py: setup -> fit -> save over TrainLoop); what is its own:
- setup: the model from `--init MODELDIR`, or built from a tokenizer and shape flags; documents
  tokenized with a BOS before each and split into train and held-out documents; rows of
  `seq_len + 1` tokens; optionally a stage-parallel pipeline (pipeline.py).
- fit: `poe_mode` decides the loss (docs/model.md §2); every evaluation reports the val bpb of every
  stage and of their Log-OP, plus a greedy sample.
- save: `final/` and `best/` (lowest Log-OP val bpb; BP: the last stage's) as base model directories,
  stored in `--save-dtype` (default: the --init model's dtype, else float32). Whatever the stored
  dtype, training runs on float32 (or `--dtype float64`) master weights: an --init model stored in
  bfloat16 is upcast once when placed.
docs/training.md, "Pretraining", has the details.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import models
from ..common.atomic import chain_inputs
from ..common.options import free_on_resume, option, run_record
from ..core.config import PoEConfig
from ..core.errors import PoelmError
from ..core.model import PoEGPT
from ..core.tokenizer import Tokenizer
from ..data.corpus import VAL_FRACTION, TextCorpus
from ..data.loader import TokenLoader, eval_batches
from ..data.shards import TokenFolder, open_corpus
from ..eval.bpb import bpb_from_sums, bpb_sums
from ..infer.engine import greedy
from ..models.card import model_card
from ..models.directory import STORAGE_DTYPES, save_model_dir, storage_dtype
from .dist import Dist, all_reduce_sum, data_parallel, log0, run_distributed
from .flops import training_flops_per_token
from .loop import LoopConfig, LoopResult, RunArgs
from .optim import build_optimizer
from .pipeline import PipelineStep, gather_state, make_pipeline, pipeline_bpb_sums, rank_stages, strip
from .recipe import (Export, Setup, batch_geometry, cadence_row, check_run_dir, record_run, resolve_seq_len,
                     run_rows, train)

SAMPLE_PROMPT = "def "


@dataclass(kw_only=True)
class PretrainArgs(RunArgs):
    """`poelm pretrain`'s arguments (options.py: each option field is a flag, and run.json records it)."""

    data: list[str] = option(help="a tokenized folder (poelm data tokenize), or text files, directories, JSONL/JSON "
                             "records, Parquet, `datasets` folders (tokenized in memory)", metavar="PATH")
    init: str | None = option(None, "start from this base directory", metavar="MODELDIR", resume=None)
    tokenizer: str | None = option(None, "build a new model with this tokenizer and --depth", metavar="TOKDIR",
                                   resume=None)
    config: PoEConfig | None = None  # the shape, when not --init (from the shape flags)
    poe_mode: str | None = None  # overrides of an --init model's PoE settings (from the shape flags)
    poe_alpha: float | None = None
    poe_stage_layers: list[int] | None = None
    seq_len: int | None = None  # (a shape flag; recorded as resolved)
    steps: int = option(1000, "optimizer steps")
    eval_tokens: int = option(65536, "held-out tokens per evaluation")
    embedding_lr: float = option(0.2, "AdamW LR of the embeddings")
    unembedding_lr: float = option(0.004, "AdamW LR of the head")
    val_fraction: float | None = option(None, f"share of documents held out (default {VAL_FRACTION}; a tokenized "
                                        "folder keeps the split it was made with)")
    sample_tokens: int = option(32, "greedy sample length at each eval (0: none)", resume=None)
    stage_parallel: int = option(1, "pipeline ranks, each owning a run of stages (under torchrun: world size = "
                                 "P x data-parallel replicas; flat mode)", metavar="P")
    dtype: str = option("float32", "the weights' and activations' dtype (float64: numerical checks, slow)",
                        choices=("float32", "float64"))
    save_dtype: str | None = option(None, "the dtype final/ and best/ store their tensors in (default: the --init "
                                    "model's, else float32); training keeps float32 master weights",
                                    choices=STORAGE_DTYPES, resume="free")
    stage_loss_fraction: float = option(1.0, "flat mode: every stage but the last takes its loss on a random "
                                        "fraction F of the positions, scaled to stay unbiased (cheaper heads)",
                                        metavar="F")


def resolve_model(args: PretrainArgs) -> tuple[PoEGPT, Any, str]:
    """The model to train, its tokenizer and the dtype its exports store by default, from --init (its
    tensors mapped, copy-on-write: training writes private pages, never the files) or from --tokenizer
    and a shape."""
    if args.init is not None:
        chain = models.open(args.init)
        model, tok, stored = chain.model(), chain.tokenizer(), storage_dtype(None, chain.dtype)
        del chain  # the model holds the tensors it needs
        changes = {k: v for k, v in (("poe_mode", args.poe_mode), ("poe_alpha", args.poe_alpha)) if v is not None}
        if args.poe_stage_layers is not None:  # re-cut the stages: readouts move, weights do not
            changes.update(poe_stage_layers=args.poe_stage_layers, poe_backout_stages=None)
            if model.config.poe_stage_heads:
                raise PoelmError("--poe-stage-layers cannot re-cut a model with per-stage heads")
        if changes:
            config = PoEConfig.from_dict({**model.config.to_dict(), **changes})
            state = model.state_dict()
            with torch.device("meta"):
                model = PoEGPT(config)
            model.load_state_dict(state, assign=True)  # the same tensors under the new cut
        return model, tok, stored
    if args.tokenizer is None or args.config is None:
        raise PoelmError("pretrain needs --init MODELDIR, or --tokenizer TOKDIR with --depth")
    tok = Tokenizer.load(args.tokenizer)
    model = PoEGPT(args.config)
    model.init_weights(seed=args.seed)
    return model, tok, "float32"


def best_key(config: PoEConfig) -> str:
    """The predictor a run is judged by: the Log-OP of all stages for PoE modes, the last stage for BP."""
    return f"stage{config.n_stages - 1}" if config.poe_mode == "none" else "logop"


def run_config(args: PretrainArgs, config: PoEConfig, seq_len: int, tokens_per_step: int) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (data, model, batch, schedule, seed)."""
    return {"command": "pretrain", **run_record(args), "seq_len": seq_len, "total_batch_tokens": tokens_per_step,
            "model": config.to_dict()}


def check_settings(args: PretrainArgs, config: PoEConfig) -> None:
    """The settings checked against the model: counts, the stage-loss fraction, stage parallelism."""
    for name in ("steps", "device_batch_size", "eval_every", "eval_tokens"):
        if getattr(args, name) < 1:
            raise PoelmError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if not 0 < args.stage_loss_fraction <= 1:
        raise PoelmError(f"--stage-loss-fraction {args.stage_loss_fraction}: expected a fraction in (0, 1]")
    if args.stage_loss_fraction < 1 and config.poe_mode != "flat":
        raise PoelmError(f"--stage-loss-fraction {args.stage_loss_fraction}: applies to --poe-mode flat, this "
                         f"model trains {config.poe_mode}")
    if args.stage_parallel != 1 and config.poe_mode != "flat":
        raise PoelmError(f"--stage-parallel {args.stage_parallel}: needs --poe-mode flat (local losses; this "
                         f"model trains {config.poe_mode})")


def readouts(args: PretrainArgs, config: PoEConfig) -> dict[int, float]:
    """{stage: share of the positions read out}: PoE modes read out every stage (flat: a share F of the
    positions but the last's), BP the last only."""
    last = config.n_stages - 1
    return {k: 1.0 if k == last else args.stage_loss_fraction for k in range(config.n_stages)
            if config.poe_mode != "none" or k == last}


def pretrain(args: PretrainArgs) -> dict[str, Any]:
    return run_distributed(args.device, train, Pretrain(args))


class Pretrain:
    """Pretraining's part of the skeleton (recipe.py): its inputs, setup, loss, evaluation and export."""

    def __init__(self, args: PretrainArgs):
        self.args = args

    def inputs(self) -> list[tuple[str, str]]:
        args = self.args
        inputs = chain_inputs(args.init, "--init model") if args.init is not None else []
        inputs += [("tokenizer", args.tokenizer)] if args.tokenizer is not None else []
        return inputs + [("data", path) for path in args.data]

    def setup(self, d: Dist) -> Setup:
        """The model and its geometry, the run folder, the corpus; then the model placed (`_place`)."""
        args, self.d = self.args, d
        self.model, self.tok, self.stored = resolve_model(args)
        config = self.config = self.model.config
        seq_len = self.seq_len = resolve_seq_len(args.seq_len, config.sequence_len)
        check_settings(args, config)
        flops = training_flops_per_token(self.model, seq_len, readouts=readouts(args, config))  # before strip
        pipe = self.pipe = None if args.stage_parallel == 1 else make_pipeline(d, config, args.stage_parallel)
        self.replicas = d.world_size if pipe is None else pipe.D  # processes that read different data
        self.replica = d.rank if pipe is None else pipe.replica
        tokens_per_step, accum = batch_geometry(args.device_batch_size, args.total_batch_tokens, seq_len, self.replicas)
        self.tokens_per_step, run_dir = tokens_per_step, Path(args.out)
        recorded = run_config(args, config, seq_len, tokens_per_step)
        ckpt = check_run_dir(run_dir, recorded, args.resume, ignore=free_on_resume(PretrainArgs) + ("data_split",))
        self.corpus = open_corpus(args.data, self.tok, args.val_fraction, progress=d.is_main,
                                  whose=f"the model ({args.init or args.tokenizer})")
        if ckpt is None:  # how val was held out (by document, or a one-document corpus's tail) is part of the record
            record_run(d, run_dir, {**recorded, "data_split": self.corpus.split()})
        log0(d, f"model: {config.n_layer} layers in stages {config.poe_stage_layers}, width {config.n_embd}, "
                f"{self.model.num_params():,} parameters, poe_mode {config.poe_mode}; {tokens_per_step:,} tokens/step "
                f"= {args.device_batch_size} x {seq_len} x {self.replicas} data replica(s) x {accum} accumulation"
                + ("" if pipe is None else f"; stage-parallel: {pipe.P} pipeline ranks, stages "
                   f"{[list(s) for s in rank_stages(config, pipe.P)]}"))
        cfg = LoopConfig(args, args.steps, accum, tokens_per_step, best_key(config), flops_per_token=flops,
                         title=f"{run_dir.name}: val bpb ({config.poe_mode})")
        return Setup(ckpt=ckpt, cfg=cfg, **self._place(d))

    def _place(self, d: Dist) -> dict[str, Any]:
        """The model on its device (a pipeline rank: its stages only), its loader, optimizer and callbacks."""
        args, model, pipe, config = self.args, self.model, self.pipe, self.config
        if pipe is not None:
            strip(model, pipe)  # after the full model was initialised from the seed, as in one process
        model.to(d.device, torch.float64 if args.dtype == "float64" else torch.float32)
        loader = TokenLoader(self.corpus.train_tokens, args.device_batch_size, self.seq_len, rank=self.replica,
                             world_size=self.replicas, seed=args.seed, pad_id=self.tok.bos_id)
        optimizer = build_optimizer(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                    unembedding_lr=args.unembedding_lr, scalar_lr=args.scalar_lr,
                                    weight_decay=args.weight_decay)
        self.token_bytes = torch.tensor(self.tok.token_bytes, dtype=torch.int64)
        parts = dict(model=model, optimizer=optimizer, loader=loader, loss_fn=self.loss, evaluate=self.evaluate)
        if pipe is None:
            unused = config.poe_mode == "none" and config.poe_stage_heads
            return dict(parts, ddp_model=data_parallel(d, model, find_unused_parameters=unused),
                        trainable=lambda: dict(model.state_dict()))
        with torch.device("meta"):
            names = set(PoEGPT(config).state_dict())
        stepper = PipelineStep(pipe, model, args.stage_loss_fraction, autocast=lambda: autocast(d.device))
        return dict(parts, stepper=stepper, trainable=lambda: gather_state(model, pipe),  # a collective: every rank
                    checkpoint_names=names)

    def loss(self, m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.d.device):
            out = m(x, targets=y, loss_reduction="sum", stage_loss_fraction=self.args.stage_loss_fraction)
        return out.loss, out.stage_losses

    def evaluate(self, step: int) -> dict[str, Any]:
        """Val bpb of every stage and the Log-OP on the held-out rows; rank 0 adds a greedy sample."""
        args, d, model, pipe, tok = self.args, self.d, self.model, self.pipe, self.tok
        batches = eval_batches(self.corpus.val_tokens, args.device_batch_size, self.seq_len,
                               max_rows=max(1, args.eval_tokens // self.seq_len), rank=self.replica,
                               world_size=self.replicas, pad_id=tok.bos_id)
        with autocast(d.device):
            if pipe is None:
                names, sums = bpb_sums(model, batches, self.token_bytes, d.device)
                sums = all_reduce_sum(d, sums)
            else:
                names, sums = pipeline_bpb_sums(model, pipe, batches, self.token_bytes)
        result: dict[str, Any] = {"val_bpb": bpb_from_sums(names, sums)}
        if d.is_main and args.sample_tokens > 0 and pipe is None:  # a stage-parallel rank 0 holds no whole model
            stop = {tok.bos_id, tok.token_id("<|assistant_end|>")}
            prompt = [tok.bos_id] + tok.encode(SAMPLE_PROMPT)
            with autocast(d.device):
                ids = greedy(model, prompt, args.sample_tokens, stop)  # the engine; train mode restored
            result["sample"] = SAMPLE_PROMPT + tok.decode(ids)
        return result

    def export(self, d: Dist, exports: Iterable[Export], result: LoopResult) -> dict[str, Any]:
        """`final/` and `best/` as base model directories, each with its model card (rank 0)."""
        args, config, run_dir, evals = self.args, self.config, Path(self.args.out), result.evals
        training = training_rows(args, config, self.corpus, self.seq_len, self.tokens_per_step, d.world_size, result)
        cpu_model = self.model.to("cpu") if self.pipe is None else PoEGPT(config)  # a pipeline rank 0: its stages only
        for name, weights, step in exports:
            cpu_model.load_state_dict(weights)
            card = model_card(cpu_model, f"{run_dir.name}/{name}", training=training + [("Exported step", step)],
                              evals=evals, best_step=result.best_step, best_key=best_key(config),
                              summary=f"A poelm PoE base pretrained with poelm ({config.poe_mode} mode). "
                                      f"This is the {name} checkpoint (step {step}).")
            save_model_dir(cpu_model, run_dir / name, self.tok, card=card, overwrite=True,
                           dtype=args.save_dtype or self.stored,
                           extra_config={"training": {"run_dir": str(run_dir), "step": step,
                                                      "val_bpb": next((e["val_bpb"] for e in evals
                                                                       if e["step"] == step), None)}})
        log0(d, f"done: {result.step} steps in {result.seconds:.0f}s; best val bpb ({best_key(config)}) "
                f"{result.best_value:.4f} at step {result.best_step}; exported {run_dir / 'final'} and "
                f"{run_dir / 'best'}")
        return {"val_bpb": [[e["step"], e["val_bpb"]] for e in evals]}


OBJECTIVES = {
    "none": "end-to-end cross-entropy on the last stage (the BP control)",
    "flat": "one cross-entropy per stage, residual stream detached between stages",
    "residual_logop": "per stage, cross-entropy of the running Log-OP of stages 0..k",
}


def training_rows(args: PretrainArgs, config: PoEConfig, corpus: TextCorpus | TokenFolder, seq_len: int, tokens_per_step: int,
                  world: int, result) -> list[tuple[str, Any]]:
    return [
        ("Objective", OBJECTIVES[config.poe_mode] + f" (poe_alpha {config.poe_alpha})"),
        ("Data", ", ".join(args.data)),
        ("Documents (train / val)", f"{corpus.train.documents:,} / {corpus.val.documents:,}"),
        ("Tokens (train / val)", f"{corpus.train.tokens:,} / {corpus.val.tokens:,}"),
        *run_rows(args, seq_len, tokens_per_step, world, result.step),
        ("Optimizer", f"MuonAdamW (matrix LR {args.matrix_lr}, embedding LR {args.embedding_lr}, "
                      f"unembedding LR {args.unembedding_lr}, scalar LR {args.scalar_lr})"),
        ("Warmup / warmdown / final LR", f"{args.warmup_frac:.0%} / {args.warmdown_frac:.0%} / {args.final_lr_frac}"),
        cadence_row(args),
        ("Best checkpoint", f"step {result.best_step}, val bpb ({best_key(config)}) {result.best_value:.4f}"),
    ]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU so CPU runs are bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
