"""PoEConfig: the shape and structure of a PoE GPT, validated when built, saved as JSON; no torch.
Structure (windows, value-embedding layers, backout layer and stages) is recorded, never recomputed, so
appending stages can never move a base layer's; every field is type-checked and bounded first, every
error names the field (docs/model.md §9.1).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import reprlib
from dataclasses import dataclass
from typing import Any

from .errors import PoelmError

POE_MODES = ("none", "flat", "residual_logop")
POE_OUTPUTS = ("last", "logop")
SMEAR_CHANNELS = 24  # smear_gate reads the first 24 channels of the normed embedding
VE_GATE_CHANNELS = 12  # ve_gate reads the first 12 channels of the attention input

# Keys that Hugging Face writes into config.json beside ours; a poelm load ignores exactly these.
HF_CONFIG_KEYS = frozenset({
    "model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "use_cache",
    "num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
    "output_hidden_states", "output_attentions", "return_dict", "is_encoder_decoder",
    "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "tokenizer_class",
    "task_specific_params", "finetuning_task", "add_cross_attention", "is_decoder",
    "cross_attention_hidden_size", "tf_legacy_loss", "pruned_heads", "torchscript",
})
# Provenance poelm records in config.json beside the model fields (facts, not structure).
PROVENANCE_KEYS = frozenset({"converted_from", "poelm_version", "training"})
# A stage directory's own fields (docs/formats.md): where its parent is and what it was trained on.
STAGE_KEYS = frozenset({"base_model_name_or_path", "stage_name", "stage_layers", "parent_fingerprint",
                        "chat_rows", "chat_rows_initialized", "parent_overrides"})


# Upper bounds of the size fields (inclusive; every size is at least 1). Released LLMs have < 200 layers,
# widths < 32k, < 200 heads and vocabularies < 300k; a context of 2M tokens is beyond any of them.
SIZE_LIMITS = {"vocab_size": 1 << 22, "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024, "n_embd": 1 << 16,
               "sequence_len": 1 << 21, "pad_vocab_to": 1 << 16}


def check_size(name: str, value: Any, source: str = "config field") -> int:
    """`value` as an int in [1, SIZE_LIMITS[name]], else a PoelmError naming the field and the bound."""
    bound = SIZE_LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= bound:
        raise PoelmError(f"{source} '{name}' = {reprlib.repr(value)}: expected an integer in [1, {bound}] "
                         f"(poelm's bound on {name})")
    return int(value)


def short_window(sequence_len: int) -> int:
    """nanochat's "S" window: a quarter of the context, rounded up to a multiple of 128."""
    return -(-sequence_len // 4 // 128) * 128


def windows_from_pattern(pattern: str, n_layer: int, sequence_len: int) -> list[int]:
    """Tile `pattern` over the layers (L = sequence_len, S = short_window); the last layer is L."""
    sizes = {"L": sequence_len, "S": short_window(sequence_len)}
    windows = [sizes[pattern[i % len(pattern)]] for i in range(n_layer)]
    windows[-1] = sequence_len
    return windows


def default_value_embed_layers(n_layer: int) -> list[int]:
    """Alternating layers with the last always included: i % 2 == (n_layer - 1) % 2."""
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


def split_stages(n_layer: int, n_stages: int) -> list[int]:
    """Split `n_layer` into `n_stages` consecutive stages, the earlier stages one layer longer."""
    base, extra = divmod(n_layer, n_stages)
    return [base + (1 if k < extra else 0) for k in range(n_stages)]


@dataclass
class PoEConfig:
    """Shape, structure and PoE settings of one model. Fields left None are derived on build."""

    # --- nanochat GPT (docs/model.md §1) ---
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    sequence_len: int = 2048
    window_pattern: str = "SSSL"
    rope_base: float = 100000.0
    softcap: float = 15.0
    pad_vocab_to: int = 64
    smear: bool = True
    backout: bool = True
    # --- structure, recorded explicitly (derived from the fields above when None) ---
    layer_windows: list[int] | None = None
    value_embed_layers: list[int] | None = None
    backout_layer: int | None = None
    # --- Product of Experts (docs/model.md §2) ---
    poe_stage_layers: list[int] | None = None
    poe_mode: str = "flat"
    poe_alpha: float = 0.0
    poe_stage_heads: bool = False
    poe_backout_stages: list[int] | None = None
    poe_output: str = "last"
    # --- specialist stages (docs/model.md §3): stages >= n_base_stages were appended to a frozen base ---
    n_base_stages: int | None = None
    stage_head: bool = False  # `specialist_head`: the leaf specialist's additive head, at the last boundary
    head_fold: bool = False  # `ancestors_head`: the ancestors' specialist heads, summed, at specialist boundaries

    def __post_init__(self) -> None:
        self._check_types()
        self._check_shape()
        if self.layer_windows is None:
            self.layer_windows = windows_from_pattern(self.window_pattern, self.n_layer, self.sequence_len)
        if self.value_embed_layers is None:
            self.value_embed_layers = default_value_embed_layers(self.n_layer)
        if self.backout and self.backout_layer is None:
            self.backout_layer = self.n_layer // 2
        if self.poe_stage_layers is None:
            self.poe_stage_layers = [self.n_layer]
        if self.poe_backout_stages is None:
            self.poe_backout_stages = [len(self.poe_stage_layers) - 1] if self.backout else []
        if self.n_base_stages is None:
            self.n_base_stages = len(self.poe_stage_layers)
        self._check_structure()

    # ----------------------------------------------------------------------------------- checks
    def _fail(self, name: str, expected: str) -> None:
        raise PoelmError(f"config field '{name}' = {reprlib.repr(getattr(self, name))}: expected {expected}")

    def _check_types(self) -> None:
        """Types first, sizes bounded; int-like values (numpy ints) become ints, tuples become lists."""
        for name in SIZE_LIMITS:
            setattr(self, name, check_size(name, getattr(self, name)))
        for name in ("rope_base", "softcap", "poe_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                self._fail(name, "a finite number")
            setattr(self, name, float(value))
        for name in ("smear", "backout", "poe_stage_heads", "stage_head", "head_fold"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "true or false")
        for name in ("window_pattern", "poe_mode", "poe_output"):
            if not isinstance(getattr(self, name), str):
                self._fail(name, "a string")
        if len(self.window_pattern) > SIZE_LIMITS["n_layer"]:
            self._fail("window_pattern", f"at most {SIZE_LIMITS['n_layer']} characters (one per layer at most)")

        def integer(value: Any) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        for name, most in (("layer_windows", SIZE_LIMITS["sequence_len"]), ("value_embed_layers", self.n_layer),
                           ("poe_stage_layers", self.n_layer), ("poe_backout_stages", self.n_layer)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or len(value) > self.n_layer or \
                    not all(integer(v) and 0 <= v <= most for v in value):
                self._fail(name, f"a list of at most n_layer={self.n_layer} integers in [0, {most}]")
            setattr(self, name, [int(v) for v in value])
        for name in ("backout_layer", "n_base_stages"):
            value = getattr(self, name)
            if value is not None and not (integer(value) and 0 <= value <= self.n_layer):
                self._fail(name, f"an integer in [0, n_layer={self.n_layer}]")
            if value is not None:
                setattr(self, name, int(value))

    def _check_shape(self) -> None:
        if self.n_embd % self.n_head:
            self._fail("n_embd", f"a multiple of n_head={self.n_head} (head_dim = n_embd / n_head)")
        if (self.n_embd // self.n_head) % 2:
            self._fail("n_embd", f"n_embd / n_head even for rotary embeddings, got head_dim {self.n_embd // self.n_head}")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            self._fail("n_kv_head", f"a divisor of n_head={self.n_head} (grouped-query attention)")
        if self.smear and self.n_embd < SMEAR_CHANNELS:
            self._fail("n_embd", f">= {SMEAR_CHANNELS} when smear is on (the smear gate reads 24 channels)")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            self._fail("window_pattern", "a non-empty string of 'S' and 'L'")
        self.window_pattern = self.window_pattern.upper()
        if not self.rope_base > 0 or not self.softcap > 0:  # finite (checked above) and positive
            self._fail("rope_base" if not self.rope_base > 0 else "softcap", "a positive number")
        if self.poe_mode not in POE_MODES:
            self._fail("poe_mode", f"one of {', '.join(POE_MODES)}")
        if self.poe_output not in POE_OUTPUTS:
            self._fail("poe_output", f"one of {', '.join(POE_OUTPUTS)}")
        if not 0.0 <= self.poe_alpha <= 1.0:
            self._fail("poe_alpha", "a number in [0, 1]")

    def _check_structure(self) -> None:
        n = self.n_layer
        if len(self.layer_windows) != n or any(w < 0 for w in self.layer_windows):
            self._fail("layer_windows", f"{n} non-negative window sizes, one per layer")
        ve = self.value_embed_layers
        if sorted(set(ve)) != ve or any(not 0 <= i < n for i in ve):
            self._fail("value_embed_layers", f"sorted, distinct layer indices in [0, {n})")
        if ve and self.n_embd < VE_GATE_CHANNELS:
            self._fail("n_embd", f">= {VE_GATE_CHANNELS} when value embeddings are on")
        stages = self.poe_stage_layers
        if not stages or any(s < 1 for s in stages) or sum(stages) != n:
            self._fail("poe_stage_layers", f"positive layer counts summing to n_layer={n}")
        k_stages = len(stages)
        backout_stages = self.poe_backout_stages
        if sorted(set(backout_stages)) != backout_stages or any(not 0 <= k < k_stages for k in backout_stages):
            self._fail("poe_backout_stages", f"sorted, distinct stage indices in [0, {k_stages})")
        if backout_stages and not self.backout:
            self._fail("poe_backout_stages", "empty when backout is off")
        if not 1 <= self.n_base_stages <= k_stages:
            self._fail("n_base_stages", f"an integer in [1, {k_stages}] (the stages of the root base)")
        if (self.stage_head or self.head_fold) and self.n_base_stages == k_stages:
            self._fail("stage_head" if self.stage_head else "head_fold",
                       "false for a base without specialist stages (n_base_stages == number of stages)")
        if backout_stages:
            first_boundary = self.stage_ends[backout_stages[0]]
            if self.backout_layer is None or not 0 <= self.backout_layer <= first_boundary:
                self._fail("backout_layer", f"a layer index <= {first_boundary}, the last layer of stage "
                           f"{backout_stages[0]}, the first stage that applies the backout")

    # ------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @property
    def n_stages(self) -> int:
        return len(self.poe_stage_layers)

    @property
    def stage_ends(self) -> list[int]:
        """Index of the last layer of each stage: the layers after which a predictor reads out."""
        ends, total = [], 0
        for n in self.poe_stage_layers:
            total += n
            ends.append(total - 1)
        return ends

    @property
    def stage_starts(self) -> list[int]:
        return [end - n + 1 for end, n in zip(self.stage_ends, self.poe_stage_layers)]

    def last_stage(self, exit_stage: Any = None) -> int:
        """The last stage a forward exiting at `exit_stage` runs (None: the model's last). The one check of
        an exit stage: every caller (forward, decoders, fleets, `truncated`) raises this one error."""
        if exit_stage is None:
            return self.n_stages - 1
        if isinstance(exit_stage, bool) or not isinstance(exit_stage, numbers.Integral) \
                or not 0 <= exit_stage < self.n_stages:
            raise PoelmError(f"exit stage {exit_stage!r} out of range: this model has stages 0..{self.n_stages - 1}")
        return int(exit_stage)

    def truncated(self, stage: int) -> "PoEConfig":
        """The config of this model cut after stage `stage` (its prefix predictor as a whole model).

        Layer structure is kept as recorded (no window or value-embedding is recomputed); the backout
        applies only at boundaries that survive the cut.
        """
        stage = self.last_stage(stage)
        n = self.stage_ends[stage] + 1
        backout_stages = [k for k in self.poe_backout_stages if k <= stage]
        keeps_backout = self.backout and self.backout_layer is not None and self.backout_layer < n
        specialist = stage >= self.n_base_stages
        return dataclasses.replace(
            self, n_base_stages=min(self.n_base_stages, stage + 1),
            stage_head=self.stage_head and stage == self.n_stages - 1, head_fold=self.head_fold and specialist,
            n_layer=n, layer_windows=self.layer_windows[:n],
            value_embed_layers=[i for i in self.value_embed_layers if i < n],
            backout=keeps_backout, backout_layer=self.backout_layer if keeps_backout else None,
            poe_stage_layers=self.poe_stage_layers[: stage + 1], poe_backout_stages=backout_stages,
        )

    # ---------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PoEConfig":
        """Build from a dict; keys Hugging Face adds are ignored, any other unknown key is an error."""
        if not isinstance(data, dict):
            raise PoelmError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k not in HF_CONFIG_KEYS
                         and k not in PROVENANCE_KEYS and k not in STAGE_KEYS
                         and not k.startswith("_"))
        if unknown:
            raise PoelmError(f"{source}: unknown config field(s) {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except PoelmError as e:
            raise PoelmError(f"{source}: {e}") from None
        except TypeError as e:  # a field of the wrong type, e.g. a string where a list belongs
            raise PoelmError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PoEConfig":
        from .files import read_json

        return cls.from_dict(read_json(path), source=str(path))


def nanochat_shape(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> dict[str, int]:
    """nanochat's shape for a depth: n_embd = 64 * depth rounded up to a multiple of head_dim 128."""
    if depth < 1:
        raise PoelmError(f"--depth {depth}: expected a positive number of layers")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return {"n_layer": depth, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_head}
