"""Model cards: the README.md every exported directory carries, in the shape of the seed's card.

Design choices: the card is generated from facts poelm already holds (the config, the parameter
table, the training record, the metrics), never typed by hand; its tables follow the seed card
(Architecture, Training, Validation bpb trajectory with a Δ column), so a poelm card reads like the
released models' cards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.files import CARD, write_text
from ..core.model import PoEGPT


def table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def architecture_rows(model: PoEGPT) -> list[tuple[str, Any]]:
    c = model.config
    return [
        ("Layers", c.n_layer), ("Width (n_embd)", c.n_embd), ("Heads / KV heads", f"{c.n_head} / {c.n_kv_head}"),
        ("Head dim", c.head_dim), ("Vocabulary", c.vocab_size), ("Context", c.sequence_len),
        ("Windows", " ".join(str(w) for w in c.layer_windows)),
        ("Value-embedding layers", ", ".join(map(str, c.value_embed_layers)) or "none"),
        ("Smear / backout", f"{'yes' if c.smear else 'no'} / "
                            f"{'layer ' + str(c.backout_layer) if c.backout else 'no'}"),
        ("PoE stages", " + ".join(map(str, c.poe_stage_layers))
         + f" (boundaries after layers {', '.join(map(str, c.stage_ends))})"),
        ("PoE mode / alpha", f"{c.poe_mode} / {c.poe_alpha}"),
        ("Total params", f"{model.num_params():,}"),
    ]


def trajectory_table(evals: list[dict[str, Any]], best_step: int | None, key: str = "logop") -> str:
    """Step | val bpb of `key` | Δ | then every other predictor's bpb, best row marked."""
    if not evals:
        return "(no evaluation yet)"
    others = [n for n in evals[0]["val_bpb"] if n != key]
    lines = [f"| Step | val bpb ({key}) | Δ | " + " | ".join(others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    prev = None
    for r in evals:
        v = r["val_bpb"][key]
        delta = "—" if prev is None else f"{v - prev:+.4f}"
        mark = " ← best" if r["step"] == best_step else ""
        lines.append(f"| {r['step']} | {v:.4f} | {delta}{mark} | "
                     + " | ".join(f"{r['val_bpb'][n]:.4f}" for n in others) + " |")
        prev = v
    return "\n".join(lines)


def model_card(model: PoEGPT, name: str, *, summary: str | None = None,
               training: list[tuple[str, Any]] | None = None, evals: list[dict[str, Any]] | None = None,
               best_step: int | None = None, best_key: str = "logop") -> str:
    params = table(("Group", "Parameters"), [(k, f"{v:,}") for k, v in model.param_table()])
    parts = [
        "---\nlibrary_name: transformers\ntags: [poelm, product-of-experts]\n---",
        f"# {name}",
        summary or ("A poelm Product-of-Experts GPT (nanochat architecture). Every stage boundary is a "
                    "next-token predictor through the shared head."),
        "Load with plain `transformers`:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n```",
        "## Architecture\n" + table(("Component", "Detail"), architecture_rows(model)),
        "## Parameters\n" + params,
    ]
    if training:
        parts.append("## Training\n" + table(("Setting", "Value"), training))
    if evals:
        parts.append("## Validation bpb trajectory\n" + trajectory_table(evals, best_step, best_key))
    return "\n\n".join(parts) + "\n"


# ---- evaluation results (`poelm eval`): one table in the card, rows replaced by key -------------
EVAL_BEGIN = "<!-- poelm eval: the rows below are written by `poelm eval`; edit outside the markers -->"
EVAL_END = "<!-- /poelm eval -->"
EVAL_HEADER = ("Benchmark", "Predictor", "Metric", "Value", "Command")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def eval_rows(card: str) -> list[tuple[str, ...]]:
    """The evaluation rows a card holds (between the markers), as written."""
    if EVAL_BEGIN not in card or EVAL_END not in card:
        return []
    body = card.split(EVAL_BEGIN, 1)[1].split(EVAL_END, 1)[0]
    rows = []
    for line in body.splitlines():
        if not line.startswith("| ") or line.startswith("| Benchmark |") or line.startswith("|---"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in line.strip()[2:-2].split(" | ")]
        if len(cells) == len(EVAL_HEADER):
            rows.append(tuple(cells))
    return rows


def with_eval_rows(card: str, new: list[tuple[str, ...]]) -> str:
    """`card` with its evaluation table updated: a row with the same benchmark, predictor and metric as a
    new one is replaced, the others are kept in order, new ones appended; the rest of the card is
    untouched (the table goes at the end the first time)."""
    keys = {row[:3] for row in new}
    rows = [row for row in eval_rows(card) if row[:3] not in keys] + [tuple(map(str, row)) for row in new]
    lines = ["| " + " | ".join(EVAL_HEADER) + " |", "|" + "---|" * len(EVAL_HEADER)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    block = f"{EVAL_BEGIN}\n" + "\n".join(lines) + f"\n{EVAL_END}"
    if EVAL_BEGIN in card and EVAL_END in card:
        head, rest = card.split(EVAL_BEGIN, 1)
        return head + block + rest.split(EVAL_END, 1)[1]
    return card.rstrip("\n") + "\n\n## Evaluation\n\n" + block + "\n"


def record_evaluation(model_dir: str | os.PathLike, rows: list[tuple[str, ...]]) -> Path:
    """Write `rows` into the evaluation table of the model directory's card (README.md, which the
    digests do not cover: the weights and their digests are not touched)."""
    path = Path(model_dir) / CARD
    card = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_text(path, with_eval_rows(card, rows))
    return path
