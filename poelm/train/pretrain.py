"""`poelm pretrain`: train a PoE base (or its backprop control) on text, one process or many.

setup -> fit -> save, over the shared TrainLoop (loop.py):
- setup: the model comes from `--init MODELDIR` or is built from a tokenizer and shape flags; the
  corpus is tokenized with a BOS before every document and split into train and held-out
  documents; the loader streams rows of `seq_len + 1` tokens; MuonAdamW holds the optimizer state.
- fit: `poe_mode` decides the loss (docs/model.md §2): `none` is end-to-end backprop on the last
  boundary (the BP control arm), `flat` one detached loss per stage, `residual_logop` the running
  Log-OP per stage. Every evaluation reports the val bpb of every stage predictor and of the Log-OP
  combination, plus a greedy sample.
- save: `final/` (the last step) and `best/` (lowest Log-OP val bpb) are exported as base model
  directories with a model card holding the architecture, training and val-bpb tables.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.card import model_card
from ..core.config import PoEConfig
from ..data.shards import TokenFolder, open_corpus
from ..data.text import TextCorpus, TokenLoader, eval_batches
from ..core.errors import PoelmError
from ..eval.bpb import bpb_from_sums, bpb_sums
from ..eval.sample import greedy_continue
from ..core.model import PoEGPT
from ..models.directory import load_model, load_tokenizer, save_model_dir
from .optim import build_optimizer
from ..common.options import free_on_resume, option, run_record
from ..common.atomic import chain_inputs, check_output
from .dist import Dist, all_reduce_sum, log0, run_distributed
from .loop import LoopConfig, RunArgs, TrainLoop, batch_geometry, check_run_dir, record_run, resolve_seq_len
from .metrics import training_flops_per_token
from .pipeline import PipelineStep, gather_state, make_pipeline, pipeline_bpb_sums, split_stages, strip
from .trackers import check_report_to

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
    val_fraction: float | None = option(None, "share of documents held out (default 0.02; a tokenized folder "
                                        "keeps the split it was made with)")
    sample_tokens: int = option(32, "greedy sample length at each eval (0: none)", resume=None)
    stage_parallel: int = option(1, "pipeline ranks, each owning a run of stages (under torchrun: world size = "
                                 "P x data-parallel replicas; flat mode)", metavar="P")
    dtype: str = option("float32", "the weights' and activations' dtype (float64: numerical checks, slow)",
                        choices=("float32", "float64"))
    stage_loss_fraction: float = option(1.0, "flat mode: every stage but the last takes its loss on a random "
                                        "fraction F of the positions, scaled to stay unbiased (cheaper heads)",
                                        metavar="F")


def resolve_model(args: PretrainArgs) -> tuple[PoEGPT, Any]:
    """The model to train and its tokenizer, from --init or from --tokenizer and a shape."""
    if args.init is not None:
        model = load_model(args.init)
        tok = load_tokenizer(args.init, model.config)
        changes = {k: v for k, v in (("poe_mode", args.poe_mode), ("poe_alpha", args.poe_alpha)) if v is not None}
        if args.poe_stage_layers is not None:  # re-cut the stages: readouts move, weights do not
            changes.update(poe_stage_layers=args.poe_stage_layers, poe_backout_stages=None)
            if model.config.poe_stage_heads:
                raise PoelmError("--poe-stage-layers cannot re-cut a model with per-stage heads")
        if changes:
            config = PoEConfig.from_dict({**model.config.to_dict(), **changes})
            state = model.state_dict()
            model = PoEGPT(config)
            model.load_state_dict(state)
        return model, tok
    if args.tokenizer is None or args.config is None:
        raise PoelmError("pretrain needs --init MODELDIR, or --tokenizer TOKDIR with --depth")
    tok = load_tokenizer(args.tokenizer)
    model = PoEGPT(args.config)
    model.init_weights(seed=args.seed)
    return model, tok


def best_key(config: PoEConfig) -> str:
    """The predictor a run is judged by: the Log-OP of all stages for PoE modes, the last stage for BP."""
    return f"stage{config.n_stages - 1}" if config.poe_mode == "none" else "logop"


def run_config(args: PretrainArgs, config: PoEConfig, seq_len: int, tokens_per_step: int) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (data, model, batch, schedule, seed)."""
    return {"command": "pretrain", **run_record(args), "seq_len": seq_len, "total_batch_tokens": tokens_per_step,
            "model": config.to_dict()}


def pretrain(args: PretrainArgs) -> dict[str, Any]:
    return run_distributed(args.device, _pretrain, args)


def _pretrain(d: Dist, args: PretrainArgs) -> dict[str, Any]:
    # ---------------------------------------------------------------------------------- setup
    report_to = check_report_to(args.report_to)  # a missing tracker package: one line, before any work
    torch.manual_seed(args.seed)
    # The run folder holds checkpoints (resume) and final/ + best/: never inside or around an input.
    inputs = chain_inputs(args.init, "--init model") if args.init is not None else []
    inputs += [("tokenizer", args.tokenizer)] if args.tokenizer is not None else []
    check_output(args.out, inputs + [("data", path) for path in args.data], overwrite=True)
    model, tok = resolve_model(args)
    config = model.config
    seq_len = resolve_seq_len(args.seq_len, config.sequence_len)
    for name in ("steps", "device_batch_size", "eval_every", "eval_tokens"):
        if getattr(args, name) < 1:
            raise PoelmError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if not 0 < args.stage_loss_fraction <= 1:
        raise PoelmError(f"--stage-loss-fraction {args.stage_loss_fraction}: expected a fraction in (0, 1]")
    if args.stage_loss_fraction < 1 and config.poe_mode != "flat":
        raise PoelmError(f"--stage-loss-fraction {args.stage_loss_fraction}: applies to --poe-mode flat, this "
                         f"model trains {config.poe_mode}")
    # PoE modes read out every stage (flat: a share F of the positions but the last's); BP the last only
    readouts = {k: 1.0 if k == config.n_stages - 1 else args.stage_loss_fraction for k in range(config.n_stages)
                if config.poe_mode != "none" or k == config.n_stages - 1}
    flops_per_token = training_flops_per_token(model, seq_len, readouts=readouts)  # the whole model, before strip
    pipe = None
    if args.stage_parallel != 1:
        if config.poe_mode != "flat":
            raise PoelmError(f"--stage-parallel {args.stage_parallel}: needs --poe-mode flat (local losses; this "
                             f"model trains {config.poe_mode})")
        pipe = make_pipeline(d, config, args.stage_parallel)
    replicas = d.world_size if pipe is None else pipe.D  # processes that read different data
    tokens_per_step, accum = batch_geometry(args.device_batch_size, args.total_batch_tokens, seq_len, replicas)
    run_dir = Path(args.out)
    recorded = run_config(args, config, seq_len, tokens_per_step)
    ckpt = check_run_dir(run_dir, recorded, args.resume, ignore=free_on_resume(PretrainArgs) + ("data_split",))
    corpus = open_corpus(args.data, tok, args.val_fraction, progress=d.is_main,
                         whose=f"the model ({args.init or args.tokenizer})")
    if ckpt is None:  # how val was held out (by document, or a one-document corpus's tail) is part of the record
        record_run(d, run_dir, {**recorded, "data_split": corpus.split()})
    log0(d, f"model: {config.n_layer} layers in stages {config.poe_stage_layers}, width {config.n_embd}, "
            f"{model.num_params():,} parameters, poe_mode {config.poe_mode}; {tokens_per_step:,} tokens/step = "
            f"{args.device_batch_size} x {seq_len} x {replicas} data replica(s) x {accum} accumulation"
            + ("" if pipe is None else f"; stage-parallel: {pipe.P} pipeline ranks, stages "
               f"{[list(s) for s in split_stages(config, pipe.P)]}"))
    if pipe is not None:
        strip(model, pipe)  # after the full model was initialised from the seed, as in one process
    model.to(d.device, torch.float64 if args.dtype == "float64" else torch.float32)
    loader = TokenLoader(corpus.train_tokens, args.device_batch_size, seq_len,
                         rank=d.rank if pipe is None else pipe.replica, world_size=replicas, seed=args.seed,
                         pad_id=tok.bos_id)
    optimizer = build_optimizer(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                unembedding_lr=args.unembedding_lr, scalar_lr=args.scalar_lr,
                                weight_decay=args.weight_decay)
    ddp_model = model
    if d.enabled and pipe is None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        unused = config.poe_mode == "none" and config.poe_stage_heads
        ddp_model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                        find_unused_parameters=unused)
    token_bytes = torch.tensor(tok.token_bytes, dtype=torch.int64)
    eval_rows = max(1, args.eval_tokens // seq_len)
    stop = {tok.bos_id, tok.token_id("<|assistant_end|>")}
    prompt = [tok.bos_id] + tok.encode(SAMPLE_PROMPT)

    def loss_fn(m, x, y):
        with autocast(d.device):
            out = m(x, targets=y, loss_reduction="sum", stage_loss_fraction=args.stage_loss_fraction)
        return out.loss, out.stage_losses

    def evaluate(step: int) -> dict[str, Any]:
        batches = eval_batches(corpus.val_tokens, args.device_batch_size, seq_len, max_rows=eval_rows,
                               rank=d.rank if pipe is None else pipe.replica, world_size=replicas, pad_id=tok.bos_id)
        with autocast(d.device):
            if pipe is None:
                names, sums = bpb_sums(model, batches, token_bytes, d.device)
                sums = all_reduce_sum(d, sums)
            else:
                names, sums = pipeline_bpb_sums(model, pipe, batches, token_bytes)
        result: dict[str, Any] = {"val_bpb": bpb_from_sums(names, sums)}
        if d.is_main and args.sample_tokens > 0 and pipe is None:  # a stage-parallel rank 0 holds no whole model
            with autocast(d.device):
                ids = greedy_continue(model, prompt, args.sample_tokens, stop, d.device)
            result["sample"] = SAMPLE_PROMPT + tok.decode(ids)
        return result

    loop_cfg = LoopConfig(
        run_dir=run_dir, steps=args.steps, accum_steps=accum, tokens_per_step=tokens_per_step,
        eval_every=args.eval_every, save_every=args.save_every or args.eval_every,
        warmup_frac=args.warmup_frac, warmdown_frac=args.warmdown_frac, final_lr_frac=args.final_lr_frac,
        best_key=best_key(config), resume=args.resume, title=f"{run_dir.name}: val bpb ({config.poe_mode})",
        flops_per_token=flops_per_token, report_to=report_to)
    if pipe is None:
        stepper, trainable, names = None, (lambda: dict(model.state_dict())), None
    else:
        stepper = PipelineStep(pipe, model, args.stage_loss_fraction, autocast=lambda: autocast(d.device))
        with torch.device("meta"):
            names = set(PoEGPT(config).state_dict())
        trainable = lambda: gather_state(model, pipe)  # noqa: E731 - a collective: every rank calls it
    loop = TrainLoop(d, loop_cfg, model=model, ddp_model=ddp_model, optimizer=optimizer, loader=loader,
                     loss_fn=loss_fn, evaluate=evaluate, trainable=trainable,
                     count_fn=lambda y: int((y >= 0).sum()), stepper=stepper, checkpoint_names=names)

    # ------------------------------------------------------------------------------------ fit
    result = loop.fit(ckpt)

    # ----------------------------------------------------------------------------------- save
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": result.step, "best_step": result.best_step,
                               "best_key": loop_cfg.best_key, "best_val_bpb": result.best_value}
    final_state = {k: v.detach().to("cpu").clone() for k, v in trainable().items()}  # every rank: a collective
    if d.is_main:
        evals = result.evals
        training = training_rows(args, config, corpus, seq_len, tokens_per_step, d.world_size, result)
        cpu_model = model.to("cpu") if pipe is None else PoEGPT(config)  # a stage-parallel rank 0: its stages only
        for name, weights, step in (("final", final_state, result.step),
                                    ("best", loop.best_weights(), result.best_step)):
            cpu_model.load_state_dict(weights)
            card = model_card(cpu_model, f"{run_dir.name}/{name}", training=training + [("Exported step", step)],
                              evals=evals, best_step=result.best_step, best_key=loop_cfg.best_key,
                              summary=f"A poelm PoE base pretrained with poelm ({config.poe_mode} mode). "
                                      f"This is the {name} checkpoint (step {step}).")
            save_model_dir(cpu_model, run_dir / name, tok, card=card, overwrite=True,
                           extra_config={"training": {"run_dir": str(run_dir), "step": step,
                                                      "val_bpb": next((e["val_bpb"] for e in evals
                                                                       if e["step"] == step), None)}})
        summary["val_bpb"] = [[e["step"], e["val_bpb"]] for e in evals]
        log0(d, f"done: {result.step} steps in {result.seconds:.0f}s; best val bpb ({loop_cfg.best_key}) "
                f"{result.best_value:.4f} at step {result.best_step}; exported {run_dir / 'final'} and "
                f"{run_dir / 'best'}")
    return summary


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
        ("Sequence length", seq_len),
        ("Per-device batch", f"{args.device_batch_size} x {seq_len}"),
        ("World size", world),
        ("Tokens per step", f"{tokens_per_step:,}"),
        ("Steps", result.step),
        ("Optimizer", f"MuonAdamW (matrix LR {args.matrix_lr}, embedding LR {args.embedding_lr}, "
                      f"unembedding LR {args.unembedding_lr}, scalar LR {args.scalar_lr})"),
        ("Warmup / warmdown / final LR", f"{args.warmup_frac:.0%} / {args.warmdown_frac:.0%} / {args.final_lr_frac}"),
        ("Eval / save cadence", f"every {args.eval_every} / {args.save_every or args.eval_every} steps"),
        ("Best checkpoint", f"step {result.best_step}, val bpb ({best_key(config)}) {result.best_value:.4f}"),
    ]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU so CPU runs are bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
